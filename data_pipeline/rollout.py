"""RLHF experience as a fixed Arrow schema, zero-copy to torch tensors and back.

One RolloutBatch holds B prompts and their responses, padded to fixed widths P (prompt,
left-padded) and R (response, right-padded):

    prompt_ids     (B, P) int64     prompt_mask   (B, P) bool
    response_ids   (B, R) int64     response_mask (B, R) bool   (1 = generated token)
    logprobs, ref_logprobs, values, rewards, advantages, returns   (B, R) float32

In Arrow each field is a FixedSizeList column of width P or R over one flat buffer (bool
stored as uint8), so ``to_arrow`` and ``from_arrow`` share memory with the tensors instead of
copying, and a record batch travels through the Ray object store as a few flat buffers
(B=64, R=256: ~0.6 MB). Tensors from ``from_arrow`` view Arrow's immutable buffers: treat
them as read-only (clone before writing in place).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROLLOUT_VERSION = 1
PROMPT_FIELDS = {"prompt_ids": torch.int64, "prompt_mask": torch.bool}
RESPONSE_FIELDS = {"response_ids": torch.int64, "response_mask": torch.bool,
                   "logprobs": torch.float32, "ref_logprobs": torch.float32,
                   "values": torch.float32, "rewards": torch.float32,
                   "advantages": torch.float32, "returns": torch.float32}
_ARROW_TYPE = {torch.int64: pa.int64(), torch.bool: pa.uint8(), torch.float32: pa.float32()}


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor      # (B, P) int64, left-padded
    prompt_mask: torch.Tensor     # (B, P) bool
    response_ids: torch.Tensor    # (B, R) int64, right-padded
    response_mask: torch.Tensor   # (B, R) bool
    logprobs: torch.Tensor        # (B, R) float32, actor log pi(a_t | s_t) at generation
    ref_logprobs: torch.Tensor    # (B, R) float32, reference model
    values: torch.Tensor          # (B, R) float32, critic V(s_t)
    rewards: torch.Tensor         # (B, R) float32, per-token (KL-shaped) rewards
    advantages: torch.Tensor      # (B, R) float32
    returns: torch.Tensor         # (B, R) float32

    def __post_init__(self) -> None:
        B, P = self.prompt_ids.shape
        R = self.response_ids.shape[1]
        for name, dtype in {**PROMPT_FIELDS, **RESPONSE_FIELDS}.items():
            t = getattr(self, name)
            want = (B, P) if name in PROMPT_FIELDS else (B, R)
            if tuple(t.shape) != want or t.dtype != dtype:
                raise ValueError(f"rollout field '{name}': expected {dtype} {want}, got "
                                 f"{t.dtype} {tuple(t.shape)}")

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in dataclasses.fields(self))

    @classmethod
    def empty(cls, B: int, P: int, R: int) -> "RolloutBatch":
        kw = {n: torch.zeros((B, P), dtype=d) for n, d in PROMPT_FIELDS.items()}
        kw.update({n: torch.zeros((B, R), dtype=d) for n, d in RESPONSE_FIELDS.items()})
        return cls(**kw)


def rollout_schema(P: int, R: int) -> pa.Schema:
    fields = [pa.field(n, pa.list_(_ARROW_TYPE[d], P)) for n, d in PROMPT_FIELDS.items()]
    fields += [pa.field(n, pa.list_(_ARROW_TYPE[d], R)) for n, d in RESPONSE_FIELDS.items()]
    return pa.schema(fields, metadata={"trellis_rollout": str(ROLLOUT_VERSION),
                                       "prompt_len": str(P), "response_len": str(R)})


def _column(t: torch.Tensor, width: int) -> pa.Array:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    flat = t.numpy().reshape(-1)
    values = pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), len(flat),
                                   [None, pa.py_buffer(flat)])  # wraps, no copy
    return pa.FixedSizeListArray.from_arrays(values, width)


def to_arrow(batch: RolloutBatch) -> pa.RecordBatch:
    """Arrow record batch sharing memory with `batch` (CPU, contiguous tensors)."""
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    cols = [_column(getattr(batch, n), P) for n in PROMPT_FIELDS]
    cols += [_column(getattr(batch, n), R) for n in RESPONSE_FIELDS]
    return pa.record_batch(cols, schema=rollout_schema(P, R))


def _tensor(col: pa.Array, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=True)
    with warnings.catch_warnings():  # Arrow buffers are immutable; numpy marks them read-only
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(flat).view(len(col), width)
    return t.view(torch.bool) if dtype == torch.bool else t


def from_arrow(rb: pa.RecordBatch | pa.Table) -> RolloutBatch:
    """RolloutBatch viewing the Arrow buffers (no copy for a record batch / 1-chunk table)."""
    meta = rb.schema.metadata or {}
    if meta.get(b"trellis_rollout") != str(ROLLOUT_VERSION).encode():
        raise ValueError("not a trellis rollout batch (schema metadata 'trellis_rollout' "
                         f"is {meta.get(b'trellis_rollout')!r})")
    fields = {**PROMPT_FIELDS, **RESPONSE_FIELDS}
    missing = [n for n in fields if n not in rb.schema.names]
    if missing:
        raise ValueError(f"rollout batch lacks column(s) {missing}")
    return RolloutBatch(**{n: _tensor(rb.column(n), d) for n, d in fields.items()})


def write_parquet(batch: RolloutBatch, path: str | Path) -> Path:
    """Save a rollout batch (e.g. run_dir/rollouts/step-000100.parquet), atomically."""
    import os
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    pq.write_table(pa.Table.from_batches([to_arrow(batch)]), tmp)
    os.replace(tmp, p)
    return p


def read_parquet(path: str | Path) -> RolloutBatch:
    try:
        table = pq.read_table(str(path))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated rollout Parquet ({e})") from None
    try:
        return from_arrow(table.combine_chunks())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def concat(batches: list[RolloutBatch]) -> RolloutBatch:
    return RolloutBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches])
                           for f in dataclasses.fields(RolloutBatch)})




def tensors_to_arrow(tensors: dict[str, torch.Tensor]) -> pa.RecordBatch:
    """Any named (B,) or (B, W) int64/float32/bool tensors -> one record batch sharing their
    memory: the partial results PPO's worker groups send the driver (log-probs, values,
    scores) travel through the Ray object store as flat Arrow buffers, not pickles."""
    cols, fields = [], []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        meta = {b"torch_dtype": str(t.dtype).encode()}
        if t.dim() == 2:
            col = _column(t, t.shape[1])
        elif t.dim() == 1:
            col = _column(t[:, None], 1).flatten()
        else:
            raise ValueError(f"tensor '{name}' must be (B,) or (B, W), got {tuple(t.shape)}")
        cols.append(col)
        fields.append(pa.field(name, col.type, metadata=meta))
    return pa.record_batch(cols, schema=pa.schema(fields))


def arrow_to_tensors(rb: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """Inverse of tensors_to_arrow (views of the Arrow buffers: read-only)."""
    out = {}
    for field in rb.schema:
        dtype = getattr(torch, field.metadata[b"torch_dtype"].decode().removeprefix("torch."))
        col = rb.column(field.name)
        if pa.types.is_fixed_size_list(field.type):
            out[field.name] = _tensor(col, dtype)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(col.to_numpy(zero_copy_only=True))
            out[field.name] = t.view(torch.bool) if dtype == torch.bool else t
    return out
