"""Per-rank memory of a DeepSpeed engine, estimated from the model's shape and our configs
(pure arithmetic; DeepSpeed is imported only to call its own estimators). Used by
`trellis plan`; checked against live engines' tensors (parallel/held_memory.py) at ZeRO 0-3.

P parameters, N ranks of the role, w bytes per element of the compute precision (4 fp32,
2 bf16/fp16), L the largest layer's parameters. Model states held by one rank, as
DeepSpeed 0.19's engines allocate them (trellis's AdamW keeps exp_avg and exp_avg_sq in fp32):

  stage  params  grads                 optimizer (fp32 master + 2 moments)  at the step
  0      wP      wP                    8P, +4P master when w < 4            -
  1, 2   wP      wP/N (stage 1 with    12P/N (a master copy even in fp32)   +4P/N (fp32 grad
                 grad_accum > 1: wP)                                         partition)
  1 bf16 wP      wP + 4P (fp32 flat)   12P/N (DeepSpeed's BF16_Optimizer)   -
  A trainable bf16 engine asked for stage 0 runs stage 1 (ParallelConfig.engine_stage).
  3      wP/N    wP/N                  8P/N, +4P/N master when w < 4 (and   +4*min(P/N, 1e9) when
                                       on CPU ranks: 'cpu' != 'cpu:0')      w < 4; +2wL gathered
  frozen (reference, reward: no optimizer, ZeRO-3 or 0): wP/N or wP; +wL gathered at ZeRO-3.
  ZeRO-3 persistence threshold t: parameters with fewer than t elements stay whole on every
  rank. offload_optimizer: optimizer state and the fp32 gradient partition live in host
  memory (the GPU keeps parameters and communication buckets); offload_params: the parameter
  partition too. Host memory per rank is at least the fp32 model each rank builds before the
  engine takes it (4P; ZeRO-3 builds layer by layer: 4L). Where DeepSpeed has an estimator
  (mixed precision, ZeRO-2 and ZeRO-3,
  `estimate_zero{2,3}_model_states_mem_needs`) its per-GPU figure is reported beside ours and
  the larger is planned with; its host figure (which includes its 1.5x buffer factor) likewise.

Activations of one training micro-batch (b sequences of s tokens, hidden h, MLP inner f,
key/value width k = kv_heads * head_dim, a heads), after Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models") with SDPA's fused attention (no
s^2 score matrix is kept, its log-sum-exp is: 4*a*s*b bytes a layer):
  per layer, elements kept for backward per token: GPT-2/BERT 8h + 2f (norm inputs and
  outputs, q, k, v, attention output, MLP input, GELU input and output); Llama 6h + 2k + 4f
  (gate, up, SiLU output and their product); times w, plus 2h bytes of dropout masks when
  dropout > 0.  Activation checkpointing keeps only each layer's input (w*b*s*h) plus one
  layer's full set while it is recomputed.  Embeddings and final norm: 2*w*b*s*h.
  LM head: logits (w), their fp32 copy for the loss (when w < 4) and the fp32 log-softmax:
  b*s*V*(w + 4 [+ 4]).  A forward without backward keeps one layer's set at a time.
KV cache of generation: 2 (K and V) * layers * k * (prompt + new tokens) * batch * w, as
model/kv_cache.py allocates it up front.
Buffers: reduce bucket (ZeRO 1-3) and ZeRO-3's prefetch bucket, parallel.bucket_elements
elements each in the compute precision.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trellis.model.shape import ModelShape
from trellis.parallel.config import ParallelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ZERO3_SUB_GROUP = 1_000_000_000
"""DeepSpeed's default ZeRO-3 sub_group_size (elements the optimizer steps at a time)."""


@dataclass(frozen=True)
class Workload:
    """What one rank of a role computes."""
    train_batch: int = 0
    """Sequences per forward+backward (0: the role does not train)."""
    seq_len: int = 1024
    """Tokens per sequence in training and scoring."""
    score_batch: int = 0
    """Sequences per forward without backward (reference/reward scoring, rollout values)."""
    gen_batch: int = 0
    """Sequences generated at once (KV cache); 0 = the role does not generate."""
    prompt_len: int = 0
    """Prompt tokens of generation (prefill)."""
    gen_len: int = 0
    """Prompt + new tokens the KV cache holds."""
    lm_head: bool = True
    """The head produces vocabulary logits (else one value per token or sequence)."""


@dataclass(frozen=True)
class RoleMemory:
    """One rank of one role, bytes."""
    role: str
    ranks: int
    zero_stage: int
    params: int
    grads: int
    optimizer: int
    step_extra: int
    """Transient at the optimizer step (fp32 gradient partition, ZeRO-3's gathered layer)."""
    activations: int
    """Training activations of one micro-batch, or a scoring forward's working set."""
    kv_cache: int
    """Generation's KV cache."""
    prefill: int
    """Generation's prompt forward (its working set, beside the KV cache)."""
    buffers: int
    host: int
    """Host (CPU) memory of this rank: offloaded states."""
    deepspeed_gpu: int | None = None
    """DeepSpeed's own estimator's per-GPU model states, where it has one."""
    deepspeed_host: int | None = None
    """DeepSpeed's estimator's host memory per node (its 1.5x buffer factor included)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer state held at rest (what held_bytes counts)."""
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        """Per-GPU peak: model states at their step peak (never below DeepSpeed's estimate),
        the larger of activations and generation (KV cache + prefill; the phases take
        turns), buffers."""
        states = max(self.model_states + self.step_extra, self.deepspeed_gpu or 0)
        return states + max(self.activations, self.kv_cache + self.prefill) + self.buffers


def planned_precision(precision: str, on_cpu: bool, width: int | None = None) -> str:
    """'auto' as a cluster's ranks would resolve it: bf16 on GPUs (Ampere and later), on CPU
    ranks what this machine's CPU supports for a model `width` wide (parallel/precision.py)."""
    if precision != "auto":
        return precision
    from trellis.parallel.precision import resolve_precision
    return resolve_precision("auto", width) if on_cpu else "bf16"


def model_states(shape: ModelShape, par: ParallelConfig, trainable: bool, on_cpu: bool = False
                 ) -> tuple[int, int, int, int, int]:
    """(params, grads, optimizer, step_extra, host) bytes of one rank; see the module doc.
    `on_cpu`: CPU ranks, where fp32 ZeRO-3 keeps a master copy too (DeepSpeed shares the
    parameters' flat buffer only when its device equals the engine's; 'cpu' != 'cpu:0')."""
    precision = planned_precision(par.precision, on_cpu, shape.d_model)
    P, N, w = shape.params, par.num_workers, BYTES[precision]
    mixed, stage = w < 4, par.engine_stage(trainable, precision)
    keep = sum(n for n in shape.param_sizes if n < par.zero3_persistence_threshold)
    part = (P - keep) / N + keep if stage == 3 else P  # parameter elements on this rank
    params, gathered = w * part, (2 if trainable else 1) * w * shape.largest_layer
    if not trainable:
        grads = opt = extra = 0.0
        extra = gathered if stage == 3 else 0.0
    elif stage == 0:
        grads, opt, extra = w * P, (12 if mixed else 8) * P, 0.0
    elif par.bf16_optimizer(trainable, precision):  # a whole fp32 gradient buffer too
        grads, opt, extra = (w + 4) * P, 12 * P / N, 0.0
    elif stage in (1, 2):
        grads = w * P if stage == 1 and par.grad_accum > 1 else w * P / N
        opt, extra = 12 * P / N, 4 * P / N
    else:
        grads, opt = w * P / N, (12 if mixed or on_cpu else 8) * P / N
        extra = (4 * min(P / N, ZERO3_SUB_GROUP) if mixed else 0.0) + gathered
    # Each rank builds the model in fp32 on the host before the engine takes it (ZeRO-3:
    # layer by layer, under zero.Init); offloaded states stay there.
    init = 4 * (shape.largest_layer if stage == 3 else P)
    host = 0.0
    if trainable and par.offload_optimizer:  # master, moments and fp32 gradients on the host
        host += opt + 4 * P / N + (4 * P / N if stage == 3 and not mixed else 0)
        opt, grads = 0.0, 0.0
        extra = gathered if stage == 3 else 0.0
    if stage == 3 and par.offload_params:
        host, params = host + params, 0.0
    host = max(host, init)
    return tuple(int(round(x)) for x in (params, grads, opt, extra, host))  # type: ignore


def deepspeed_estimate(shape: ModelShape, par: ParallelConfig, trainable: bool,
                       gpus_per_node: int) -> tuple[int, int] | None:
    """(per-GPU, host per node) model-state bytes from DeepSpeed's own estimators: mixed
    precision, trainable, ZeRO-2 or ZeRO-3; None elsewhere (they assume 16-bit weights)."""
    precision = planned_precision(par.precision, not gpus_per_node, shape.d_model)
    stage = par.engine_stage(trainable, precision)
    if not trainable or precision == "fp32" or stage not in (2, 3):
        return None
    per_node = max(1, min(par.num_workers, gpus_per_node or par.num_workers))
    nodes = math.ceil(par.num_workers / per_node)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shape.params, per_node, nodes, cpu_offload=par.offload_optimizer)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, per_node, nodes,
            cpu_offload=par.offload_optimizer, cpu_offload_params=par.offload_params)
    return int(gpu), int(cpu)


def _layer_elems(shape: ModelShape) -> int:
    """Activation elements one layer keeps per token for backward (module doc)."""
    h, f = shape.d_model, shape.ff_dim
    kv = shape.n_kv_head * shape.head_dim
    return 6 * h + 2 * kv + 4 * f if shape.gated_mlp else 8 * h + 2 * f


def _head_bytes(shape: ModelShape, tokens: int, w: int, lm: bool) -> int:
    return tokens * shape.vocab_size * (w + 4 + (4 if w < 4 else 0)) if lm else 0


def activation_bytes(shape: ModelShape, batch: int, seq: int, w: int, checkpointing: bool,
                     backward: bool, lm_head: bool) -> int:
    """Activations of one forward (+ backward) of `batch` sequences of `seq` tokens."""
    if batch <= 0:
        return 0
    tokens = batch * seq
    layer = tokens * (_layer_elems(shape) * w + 4 * shape.n_head
                      + (2 * shape.d_model if shape.dropout else 0))
    if not backward:
        kept = layer
    elif checkpointing:
        kept = shape.n_layer * tokens * shape.d_model * w + layer
    else:
        kept = shape.n_layer * layer
    return kept + 2 * tokens * shape.d_model * w + _head_bytes(shape, tokens, w, lm_head)


def kv_cache_bytes(shape: ModelShape, batch: int, length: int, w: int) -> int:
    return 2 * shape.n_layer * shape.n_kv_head * shape.head_dim * length * batch * w


def role_memory(role: str, shape: ModelShape, par: ParallelConfig, trainable: bool,
                work: Workload, gpus_per_node: int) -> RoleMemory:
    """One rank of `role` (par.num_workers ranks), bytes; see the module doc."""
    par = dataclasses.replace(par, precision=planned_precision(par.precision, not gpus_per_node,
                                                               shape.d_model))
    w = BYTES[par.precision]
    params, grads, opt, extra, host = model_states(shape, par, trainable, not gpus_per_node)
    stage = par.engine_stage(trainable, par.precision)
    acts = max(activation_bytes(shape, work.train_batch if trainable else 0, work.seq_len, w,
                                par.activation_checkpointing, True, work.lm_head),
               activation_bytes(shape, work.score_batch, work.seq_len, w, False, False,
                                work.lm_head))
    kv = kv_cache_bytes(shape, work.gen_batch, work.gen_len, w)
    prefill = activation_bytes(shape, work.gen_batch, work.prompt_len, w, False, False, True)
    buffers = 0 if stage == 0 else par.bucket_elements * w * (2 if stage == 3 else 1)
    ds = deepspeed_estimate(shape, par, trainable, gpus_per_node)
    return RoleMemory(role, par.num_workers, stage, params, grads, opt, extra, acts, kv, prefill,
                      buffers, host, ds[0] if ds else None, ds[1] if ds else None)
