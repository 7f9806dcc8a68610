"""Held-out loss on a public recipe: trellis pretraining vs a minimal nanoGPT-style loop.

The recipe is nanoGPT's documented CPU configuration (character level; 4 layers, 4 heads,
d_model 128, context 64, batch 12, AdamW lr 1e-3 with 100 warmup steps and cosine decay to
1e-4 at 2000 steps, betas (0.9, 0.99), weight decay 0.1 on matrices, clip 1.0, dropout 0),
on one long embedded text: CPython's pydoc topics concatenated (~465K characters), split
90/10 by position.

    trellis-shuffled    PretrainWorker.train_step (TokenStream -> clm_collate -> DeepSpeed
    trellis-sequential  engine, in-process) with data.order shuffled / sequential
    trellis-bf16        trellis-shuffled with parallel.precision=bf16 (what precision=auto, the
                        default, picks on CPUs with AMX/AVX512-BF16 and on GPUs)
    trellis-nobias      trellis-shuffled with model.bias=false (no biases, as the reference;
                        not in the default --variants)
    trellis-nanogpt-bf16
                        nanoGPT's own model (model.bias=false, model.activation=gelu: exact
                        GELU) in bf16: the recipe as its users would run it on trellis
    reference           plain torch, written here: nanoGPT's model (no biases, GPT-2 init),
                        random-offset windows, nanoGPT's get_lr, torch AdamW, clip

All variants see the same character ids and are scored by the same function: the mean loss
over every non-overlapping 64-token window of the held-out 10% (not a sample of batches).
Steps are interleaved (one step of each variant per cycle) so load from other processes
hits them alike; wall is the sum of each variant's step times (evaluation excluded).

    python bench/recipe.py [--steps 2000] [--eval-every 250] [--threads 2] [--seed 0]
                           [--precision fp32|bf16|auto] [--variants a,b,...]
--precision sets trellis-shuffled/sequential/nobias (fp32 by default: the reference's).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see ENVIRONMENT.md: CPU sharing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from trellis.data_pipeline.shards import make_token_dataset  # noqa: E402
from trellis.launcher.config_loader import load_config  # noqa: E402
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig  # noqa: E402

SPECIAL = 4  # ids 0-3 are trellis's special tokens (pad, ..., EOS); characters start at 4


@dataclasses.dataclass
class Recipe:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    T: int = 64
    B: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    clip: float = 1.0


def corpus() -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, val ids, vocab size): the pydoc topics as character ids, split 90/10."""
    from pydoc_data.topics import topics
    text = "".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    lut = {c: SPECIAL + i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int64, count=len(text))
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], SPECIAL + len(chars)


# ---- the reference: nanoGPT's model and loop, minimal -------------------------------------
class RefBlock(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    """nanoGPT's GPT with bias=False: tied head, N(0, 0.02) init, residual projections
    N(0, 0.02/sqrt(2L))."""

    def __init__(self, r: Recipe, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, r.d_model), nn.Embedding(r.T, r.d_model)
        self.h = nn.ModuleList(RefBlock(r.d_model, r.n_head) for _ in range(r.n_layer))
        self.ln_f = nn.LayerNorm(r.d_model, bias=False)
        self.lm_head = nn.Linear(r.d_model, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * r.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def nanogpt_lr(it: int, r: Recipe) -> float:
    """nanoGPT's get_lr with lr_decay_iters = steps."""
    if it < r.warmup:
        return r.lr * (it + 1) / (r.warmup + 1)
    if it > r.steps:
        return r.min_lr
    ratio = (it - r.warmup) / (r.steps - r.warmup)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.lr - r.min_lr)


class Reference:
    def __init__(self, r: Recipe, train: np.ndarray, vocab: int, seed: int):
        torch.manual_seed(seed)
        self.r, self.model = r, RefGPT(r, vocab)
        self.data = torch.from_numpy(train)
        self.gen = torch.Generator().manual_seed(seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=r.lr, betas=r.betas)
        self.it = 0

    def step(self) -> None:
        r = self.r
        ix = torch.randint(len(self.data) - r.T, (r.B,), generator=self.gen)
        x = torch.stack([self.data[i:i + r.T + 1] for i in ix.tolist()])  # (B, T+1)
        for g in self.opt.param_groups:
            g["lr"] = nanogpt_lr(self.it, r)
        self.model.train()
        logits = self.model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.it += 1

    def module(self) -> nn.Module:
        return self.model


# ---- trellis -------------------------------------------------------------------------------
class Trellis:
    """The pretrain job's own rank worker, in-process (what `trellis pretrain --local` runs)."""

    def __init__(self, r: Recipe, data_dir: Path, val_dir: Path, vocab: int, order: str,
                 seed: int, precision: str, run_dir: Path, bias: bool = True,
                 activation: str = "gelu_tanh"):
        from trellis.launcher.jobs.pretrain.worker import PretrainWorker
        cfg = load_config(PretrainJobConfig, None, [
            f"run_dir={run_dir}", f"seed={seed}", f"model.vocab_size={vocab}",
            f"model.n_layer={r.n_layer}", f"model.n_head={r.n_head}",
            f"model.d_model={r.d_model}", f"model.max_seq_len={r.T}", "model.dropout=0.0",
            f"model.bias={str(bias).lower()}", f"model.activation={activation}",
            f"data.seq_len={r.T}", f"data.order={order}",
            f"data.val_path={val_dir}",
            f"data.seed={seed}", f"parallel.micro_batch_size={r.B}",
            f"parallel.precision={precision}", f"optim.lr={r.lr}",
            f"optim.warmup_steps={r.warmup}", f"optim.min_lr_ratio={r.min_lr / r.lr}",
            f"optim.betas=[{r.betas[0]}, {r.betas[1]}]", f"optim.weight_decay={r.weight_decay}",
            f"optim.grad_clip={r.clip}", f"train.steps={r.steps}", "train.sample_tokens=0"])
        self.worker = PretrainWorker(0, 1, dataclasses.asdict(cfg), str(data_dir), str(val_dir),
                                     str(run_dir))

    def step(self) -> None:
        self.worker.train_step()

    def module(self) -> nn.Module:
        return self.worker.engine.module


# ---- measuring -----------------------------------------------------------------------------
@torch.no_grad()
def val_loss(module: nn.Module, val: np.ndarray, T: int) -> float:
    """Mean next-token loss over every non-overlapping T-window of the held-out ids."""
    was = module.training
    module.eval()
    n = (len(val) - 1) // T
    x = torch.from_numpy(val[:n * T + 1])
    inp, tgt = x[:-1].view(n, T), x[1:].view(n, T)
    total = 0.0
    for i in range(0, n, 256):
        logits = module(inp[i:i + 256]).float()
        total += F.cross_entropy(logits.flatten(0, 1), tgt[i:i + 256].flatten(),
                                 reduction="sum").item()
    module.train(was)
    return total / (n * T)


def run(variants: dict[str, object], r: Recipe, val: np.ndarray, every: int
        ) -> tuple[dict[str, dict[int, float]], dict[str, list[float]]]:
    curves: dict[str, dict[int, float]] = {n: {} for n in variants}
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for it in range(r.steps + 1):
        if it % every == 0 or it == r.steps:
            for n in names:
                curves[n][it] = val_loss(variants[n].module(), val, r.T)
            print(f"  step {it:5d}: " + "  ".join(f"{n} {curves[n][it]:.4f}" for n in names),
                  flush=True)
        if it == r.steps:
            break
        for n in names[it % len(names):] + names[:it % len(names)]:
            t0 = time.perf_counter()
            variants[n].step()
            times[n].append(time.perf_counter() - t0)
    return curves, times


def report(curves: dict[str, dict[int, float]], times: dict[str, list[float]]) -> None:
    ref = "reference"
    print(f"\n{'variant':20} {'final val':>9} {'- ref':>8} {'wall s':>8} {'wall/ref':>8} "
          f"{'step ms':>8}  per-step time ratio to ref: median [quartiles]")
    for n, c in curves.items():
        last = c[max(c)]
        d = last - curves[ref][max(c)] if ref in curves else float("nan")
        w = sum(times[n])
        wr = w / sum(times[ref]) if ref in times else float("nan")
        if ref in times and n != ref:
            q = statistics.quantiles([a / b for a, b in zip(times[n], times[ref])], n=4)
            qs = f"{q[1]:.3f}x [{q[0]:.3f}..{q[2]:.3f}]"
        else:
            qs = ""
        print(f"{n:20} {last:9.4f} {d:+8.4f} {w:8.1f} {wr:8.3f} "
              f"{1e3 * statistics.median(times[n]):8.1f}  {qs}")
    steps = sorted(next(iter(curves.values())))
    print("\nval loss by step: " + "  ".join(f"{s}" for s in steps))
    for n, c in curves.items():
        print(f"  {n:20} " + " ".join(f"{c[s]:.3f}" for s in steps))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--variants",
                    default="trellis-shuffled,trellis-sequential,trellis-bf16,"
                            "trellis-nanogpt-bf16,reference")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    r = Recipe(steps=args.steps)
    train, val, vocab = corpus()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; text {len(train) + len(val):,} "
          f"chars (train {len(train):,}, val {len(val):,}), vocab {vocab}; {r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        make_token_dataset(tmp_path / "train", [train.tolist()], 1, vocab_size=vocab)
        make_token_dataset(tmp_path / "val", [val.tolist()], 1, vocab_size=vocab)
        makers: dict[str, Callable[[], object]] = {
            "reference": lambda: Reference(r, train, vocab, args.seed)}
        for order in ("shuffled", "sequential"):
            makers[f"trellis-{order}"] = lambda o=order: Trellis(
                r, tmp_path / "train", tmp_path / "val", vocab, o, args.seed, args.precision,
                tmp_path / f"run-{o}")
        makers["trellis-bf16"] = lambda: Trellis(
            r, tmp_path / "train", tmp_path / "val", vocab, "shuffled", args.seed, "bf16",
            tmp_path / "run-bf16")
        makers["trellis-nanogpt-bf16"] = lambda: Trellis(
            r, tmp_path / "train", tmp_path / "val", vocab, "shuffled", args.seed, "bf16",
            tmp_path / "run-nanogpt-bf16", bias=False, activation="gelu")
        makers["trellis-nobias"] = lambda: Trellis(
            r, tmp_path / "train", tmp_path / "val", vocab, "shuffled", args.seed,
            args.precision, tmp_path / "run-nobias", bias=False)
        variants = {n: makers[n]() for n in args.variants.split(",")}
        t0 = time.perf_counter()
        curves, times = run(variants, r, val, args.eval_every)
    report(curves, times)
    print(f"\nbench wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
