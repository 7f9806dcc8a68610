"""Pretraining throughput and ZeRO memory per rank (prints, never asserts).

1. Speed: training tokens/s at the same config, batch, AdamW hyperparameters and thread count:
     trellis-engine  model.build GPT through parallel.engine.Engine (DeepSpeed ZeRO-0, fp32,
                     world 1 in-process)
     trellis-plain   the same GPT with torch.optim.AdamW + clip_grad_norm_ (no DeepSpeed)
     trellis-compiled  (--compile) trellis-engine with Engine.compile (train.compile: inductor;
                     compiled during its warm-up step)
     trellis-nobias  (--bias-free) trellis-engine with model.bias=False: no biases in linear
                     layers and LayerNorms (a different model from GPT-2, which has them)
     hf-sdpa/eager   transformers GPT2LMHeadModel (forward with labels) + torch AdamW + clip
     trellis-bf16    trellis-engine with parallel.precision=bf16 (DeepSpeed bf16: bf16 weights,
                     fp32 master weights in the optimizer); by default where bf16 is native,
                     which is what the default parallel.precision=auto picks there
     hf-sdpa-bf16    hf-sdpa with the HF Trainer's bf16=True (fp32 weights, autocast forward)
   Every variant's AdamW is the engine's (parallel.engine.adamw: fused where torch has it,
   as the HF Trainer's default adamw_torch_fused on torch >= 2.8).
   Same random token batches; warm-up steps, then interleaved cycles (one step of each variant
   per cycle, so load from other users of the machine hits them alike). Tokens/s from the median
   and the best step, CPU-time tokens/s, the fwd/bwd/optimizer split, and trellis/HF ratios.
   Goals: trellis-engine >= 1.25x hf-sdpa at 1 and at 2 threads (--threads 1,2 runs both),
   engine overhead over trellis-plain < 2%. --profile adds torch.profiler op tables.
2. Memory: bytes of parameters + gradients + optimizer state (fp32 master + exp_avg/exp_avg_sq)
   each rank holds, for ZeRO-0..3 at world size 1 and 2 (processes via torch.multiprocessing,
   gloo on loopback), counted from the live engines' tensors (unique storages). Goal: ZeRO-3
   <= 0.55x. A what-if row shows ZeRO-3 with stage3_param_persistence_threshold=0.

    python bench/pretrain.py [--preset gpt-small-cpu] [--threads 1,2] [--cycles 10] [--no-eager]
                               [--compile] [--bias-free] [--bf16 auto|on|off] [--profile] [--only speed|memory]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# OpenMP's default spin-waiting makes 2 threads on 2 cores shared with other busy processes
# 5-10x slower (a barrier waits for a descheduled thread); passive waits cost little when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from trellis.model.build import build_model  # noqa: E402
from trellis.model.config import ModelConfig  # noqa: E402
from trellis.model.losses import token_cross_entropy  # noqa: E402
from trellis.parallel.config import OptimConfig, ParallelConfig  # noqa: E402
from trellis.parallel.engine import adamw, param_groups  # noqa: E402
from trellis.parallel.precision import resolve_precision  # noqa: E402

OPT = OptimConfig(lr=3e-4, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, grad_clip=1.0)
Step = Callable[[torch.Tensor], dict[str, float]]  # (B, T+1) tokens -> phase seconds


# ---- the variants ------------------------------------------------------------------------
def torch_adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW as the engine builds it (same groups, hyperparameters, fused kernel)."""
    return adamw(param_groups(model, OPT.weight_decay), OPT)


def phases(fwd: Callable[[], torch.Tensor], bwd: Callable[[torch.Tensor], None],
           opt: Callable[[], None]) -> dict[str, float]:
    t0 = time.perf_counter()
    loss = fwd()
    t1 = time.perf_counter()
    bwd(loss)
    t2 = time.perf_counter()
    opt()
    return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": time.perf_counter() - t2}


def trellis_engine_step(cfg: ModelConfig, batch: int, total_steps: int,
                        compiled: bool = False, precision: str = "fp32") -> Step:
    from trellis.parallel.engine import Engine
    torch.manual_seed(0)
    engine = Engine(build_model(cfg), OPT, ParallelConfig(zero_stage=0, micro_batch_size=batch,
                                                          precision=precision),
                    total_steps=total_steps)
    if compiled:
        engine.compile()

    def step(x: torch.Tensor) -> dict[str, float]:  # x (B, T+1)
        return phases(lambda: token_cross_entropy(engine(x[:, :-1]), x[:, 1:]),
                      engine.backward, engine.step)
    return step


def plain_step(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Step:
    """Plain torch loop: forward, backward, clip, AdamW step, zero_grad."""
    model.train()
    opt = torch_adamw(model)

    def optimize() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(x: torch.Tensor) -> dict[str, float]:
        return phases(lambda: loss_fn(x), lambda loss: loss.backward(), optimize)
    return step


def trellis_plain_step(cfg: ModelConfig) -> Step:
    torch.manual_seed(0)
    model = build_model(cfg)
    return plain_step(model, lambda x: token_cross_entropy(model(x[:, :-1]), x[:, 1:]))


def hf_step(cfg: ModelConfig, attn: str, bf16: bool = False) -> Step:
    """GPT2LMHeadModel at the same sizes (tied head, tanh GELU, no dropout). HF shifts labels
    itself, so it predicts T-1 of the T positions (trellis: T); 1/T less loss work."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hc = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ff_dim,
                    activation_function="gelu_new", resid_pdrop=cfg.dropout,
                    embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    layer_norm_epsilon=cfg.layer_norm_eps, use_cache=False,
                    bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(hc, attn_implementation=attn)
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"transformers gave attention '{model.config._attn_implementation}'"
                           f", asked for '{attn}'")

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        # bf16: the HF Trainer's bf16=True (fp32 weights, forward under CPU/GPU autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=x[:, :-1], labels=x[:, :-1], use_cache=False).loss
    return plain_step(model, loss_fn)


# ---- timing ------------------------------------------------------------------------------
def run_interleaved(variants: dict[str, Step], data: list[torch.Tensor], warmup: int,
                    cycles: int) -> dict[str, list[dict[str, float]]]:
    """Each cycle runs one step of every variant, the order rotating by cycle, so a burst of
    load from other processes lands on neighbouring steps of different variants alike."""
    names = list(variants)
    for name in names:
        for i in range(warmup):
            variants[name](data[i % len(data)])
    out: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for c in range(cycles):
        for name in names[c % len(names):] + names[:c % len(names)]:
            c0 = time.process_time()
            rec = variants[name](data[c % len(data)])
            rec["cpu"] = time.process_time() - c0
            rec["wall"] = rec["fwd"] + rec["bwd"] + rec["opt"]
            out[name].append(rec)
        print(f"  cycle {c + 1}/{cycles}: " + ", ".join(
            f"{n} {out[n][-1]['wall']:.2f}s" for n in names), flush=True)
    return out


def med(recs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in recs)


def report_speed(res: dict[str, list[dict[str, float]]], tokens: int) -> None:
    print(f"\n{'variant':16} {'tok/s':>7} {'tok/s':>7} {'tok/CPU-s':>9} {'fwd ms':>8}"
          f" {'bwd ms':>8} {'opt ms':>7}\n{'':16} {'median':>7} {'best':>7} {'median':>9}"
          f" {'median':>8} {'median':>8} {'median':>7}")
    for name, recs in res.items():
        print(f"{name:16} {tokens / med(recs, 'wall'):7,.0f}"
              f" {tokens / min(r['wall'] for r in recs):7,.0f} {tokens / med(recs, 'cpu'):9,.0f}"
              f" {1e3 * med(recs, 'fwd'):8.1f} {1e3 * med(recs, 'bwd'):8.1f}"
              f" {1e3 * med(recs, 'opt'):7.1f}")
    print("\nratios of tokens/s: median of per-cycle ratios [quartiles], ratio of best steps, "
          "ratio of median CPU time")
    pairs = [(a, b) for a in ("trellis-engine", "trellis-compiled", "trellis-nobias",
                              "trellis-plain") for b in res if b.startswith("hf-")
             and not b.endswith("-bf16")]
    pairs += [("trellis-bf16", "hf-sdpa-bf16"), ("trellis-bf16", "hf-sdpa"),
              ("trellis-bf16", "trellis-engine")]
    for a, b in pairs + [("trellis-engine", "trellis-plain"),
                         ("trellis-compiled", "trellis-engine"),
                         ("trellis-nobias", "trellis-engine")]:
        if a not in res or b not in res:
            continue
        paired = sorted(rb["wall"] / ra["wall"] for ra, rb in zip(res[a], res[b]))
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        best = min(r["wall"] for r in res[b]) / min(r["wall"] for r in res[a])
        goal = {("trellis-engine", "hf-sdpa"): "  (goal >= 1.25x)",
                ("trellis-engine", "trellis-plain"): "  (goal >= 0.98x)"}.get((a, b), "")
        print(f"  {a:>14} / {b:<14} {q[1]:.3f}x [{q[0]:.3f}..{q[2]:.3f}]  best {best:.3f}x  "
              f"CPU {med(res[b], 'cpu') / med(res[a], 'cpu'):.3f}x{goal}")


def profile(variants: dict[str, Step], x: torch.Tensor, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile
    for name, step in variants.items():
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            step(x)
        print(f"\n--- torch.profiler, one step of {name} (self CPU time) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                        max_name_column_width=40))


def speed(args: argparse.Namespace, cfg: ModelConfig) -> None:
    B, T = args.batch, args.seq
    steps = args.warmup + args.cycles
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(8)]
    variants: dict[str, Step] = {
        "trellis-engine": trellis_engine_step(cfg, B, total_steps=10 * steps + 10),
        "trellis-plain": trellis_plain_step(cfg),
        "hf-sdpa": hf_step(cfg, "sdpa"),
    }
    if not args.no_eager:
        variants["hf-eager"] = hf_step(cfg, "eager")
    if args.compile:
        variants["trellis-compiled"] = trellis_engine_step(cfg, B, 10 * steps + 10, compiled=True)
    if args.bias_free:
        variants["trellis-nobias"] = trellis_engine_step(replace(cfg, bias=False), B,
                                                         10 * steps + 10)
    if args.bf16 == "on" or (args.bf16 == "auto" and resolve_precision("auto") == "bf16"):
        variants["trellis-bf16"] = trellis_engine_step(cfg, B, 10 * steps + 10, precision="bf16")
        variants["hf-sdpa-bf16"] = hf_step(cfg, "sdpa", bf16=True)
    print(f"speed: {len(variants)} variants x ({args.warmup} warm-up + {args.cycles} interleaved "
          f"steps), {B} x {T} = {B * T} tokens/step", flush=True)
    res = run_interleaved(variants, data, args.warmup, args.cycles)
    report_speed(res, B * T)
    if args.profile:
        profile(variants, data[0], args.profile_rows)


# ---- memory ------------------------------------------------------------------------------
# Per-rank bytes by category, ZeRO-3 fp32 masters included (the same counter trellis plan
# is validated against).
from trellis.parallel.held_memory import held_bytes  # noqa: E402


def memory_worker(rank: int, world: int, port: int, cfg: ModelConfig, stages: list,
                  queue) -> None:
    """One rank: for each stage build a fresh engine, take a step, run the next micro-batch's
    forward+backward (gradients live, optimizer state allocated), count, then step."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import trellis.parallel.engine as pe
    from trellis.parallel import dist
    dist.init_distributed(rank, world, master_port=port, backend="gloo")
    g = torch.Generator().manual_seed(rank)
    T = min(32, cfg.max_seq_len)  # any size will do: only parameter-sized tensors are counted
    x = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=g)  # (B, T+1)
    plain_ds_config = pe.ds_config
    for stage, persist in stages:
        def patched(*a, **kw):  # the what-if row only: ZeRO-3 partitions small params too
            out = plain_ds_config(*a, **kw)
            if persist is not None:
                out["zero_optimization"]["stage3_param_persistence_threshold"] = persist
            return out
        pe.ds_config = patched
        par = ParallelConfig(num_workers=world, zero_stage=stage, micro_batch_size=2,
                             precision="fp32")
        torch.manual_seed(0)
        with pe.zero_init_context(par):
            model = build_model(cfg)
        engine = pe.Engine(model, OPT, par, total_steps=10)
        for i in range(2):
            engine.backward(token_cross_entropy(engine(x[:, :-1]), x[:, 1:]))
            if i == 0:
                engine.step()
        sizes = held_bytes(engine)
        engine.step()
        queue.put((world, rank, stage, persist, sizes, engine.global_param_numel()))
        del engine, model
        gc.collect()
    pe.ds_config = plain_ds_config
    dist.barrier()
    dist.destroy_distributed()


def memory(args: argparse.Namespace, cfg: ModelConfig) -> None:
    import torch.multiprocessing as mp
    from trellis.parallel.dist import free_port
    stages = [(0, None), (1, None), (2, None), (3, None), (3, 0)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = []
    t0 = time.perf_counter()
    for world in (1, 2):  # both groups at once: independent ports, nothing timed here
        port = free_port()
        for rank in range(world):
            p = ctx.Process(target=memory_worker, args=(rank, world, port, cfg, stages, queue))
            p.start()
            procs.append(p)
    results = [queue.get(timeout=args.memory_timeout) for _ in range(len(stages) * 3)]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"memory worker {p.pid} exited with {p.exitcode}")
    print(f"memory: {len(procs)} processes, {time.perf_counter() - t0:.1f} s; "
          f"{results[0][5]:,} parameters (fp32)")
    report_memory(results, stages)


def report_memory(results: list, stages: list) -> None:
    by = {(w, r, s, p): sizes for w, r, s, p, sizes, _ in results}
    mib = 1 << 20
    print(f"\nbytes per rank (MiB; world 2 = max over its 2 ranks): params + grads + fp32 master"
          f" + optimizer state\n{'stage':12} {'world 1':>8} {'world 2':>8} {'ratio':>6}   "
          f"world 2 rank 0: {'params':>7} {'grads':>7} {'master':>7} {'state':>7} | other")
    for stage, persist in stages:
        one = by[(1, 0, stage, persist)]
        two = [by[(2, r, stage, persist)] for r in (0, 1)]
        w2 = max(t["total"] for t in two)
        label = f"ZeRO-{stage}" + (f" p={persist}" if persist is not None else "")
        t = two[0]
        print(f"{label:12} {one['total'] / mib:8.2f} {w2 / mib:8.2f} {w2 / one['total']:6.3f}"
              f"   {'':16}{t['params'] / mib:7.2f} {t['grads'] / mib:7.2f} "
              f"{t['master'] / mib:7.2f} {t['state'] / mib:7.2f} | {t['other'] / mib:.1f}")
    for stage, persist in stages:
        path, n = by[(2, 0, stage, persist)]["biggest_other"]
        if n:
            print(f"  ZeRO-{stage}{'' if persist is None else f' p={persist}'}: largest 'other'"
                  f" tensor {path} {n / mib:.1f} MiB")
    print("ratio = world 2 / world 1 per rank (goal: ZeRO-3 <= 0.55x). 'other' = further "
          "tensors the ZeRO optimizer holds (communication buckets: torch.empty, so mostly "
          "untouched pages), not in the totals. p=0: stage3_param_persistence_threshold=0 "
          "(trellis's default since parallel.zero3_persistence_threshold; DeepSpeed's own is 1e5).")


# ---- main --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt-small-cpu")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's n_layer")
    ap.add_argument("--d-model", type=int, default=0, help="override d_model (n_head = d/64)")
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", default="2", help="comma list: the speed part runs per count")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    ap.add_argument("--cycles", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--no-eager", action="store_true", help="skip HF with eager attention")
    ap.add_argument("--compile", action="store_true",
                    help="add trellis-engine with torch.compile (train.compile)")
    ap.add_argument("--bias-free", action="store_true",
                    help="add trellis-engine with model.bias=False")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="trellis-bf16 and hf-sdpa-bf16 variants: auto = where bf16 is native")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table per variant")
    ap.add_argument("--profile-rows", type=int, default=12)
    ap.add_argument("--only", choices=["speed", "memory"])
    ap.add_argument("--memory-timeout", type=float, default=300.0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    over = {"vocab_size": args.vocab, "max_seq_len": max(args.seq, 1), "dropout": 0.0}
    if args.layers:
        over["n_layer"] = args.layers
    if args.d_model:
        over.update(d_model=args.d_model, n_head=max(1, args.d_model // 64))
    cfg = ModelConfig.from_preset(args.preset, **over)
    threads = [int(t) for t in str(args.threads).split(",")]
    torch.set_num_threads(threads[0])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (interop "
          f"{torch.get_num_interop_threads()}), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']},"
          f" load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    tag = args.preset + (" (overridden)" if args.layers or args.d_model else "")
    print(f"model: {tag} n_layer={cfg.n_layer} d_model={cfg.d_model} n_head={cfg.n_head}"
          f" vocab={cfg.vocab_size} seq={args.seq} batch={args.batch}; AdamW lr={OPT.lr} "
          f"betas={OPT.betas} wd={OPT.weight_decay} clip={OPT.grad_clip}", flush=True)
    t0 = time.perf_counter()
    if args.only in (None, "speed"):
        for n in threads:
            torch.set_num_threads(n)
            print(f"\n=== speed at {n} thread(s) ===", flush=True)
            speed(args, cfg)
    if args.only in (None, "memory"):
        memory(args, cfg)
    print(f"\nbench wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
