"""One GPU, no Ray, no DeepSpeed: GPT-2 124M training speed with MFU, KV-cache generation
tokens/s, and one PPO iteration of a tiny policy in-process (prints, never asserts).

    python bench/gpu.py [--steps 20] [--batch 16] [--seq 1024] [--compile]
                        [--gen-batches 1,32,256] [--gen-tokens 128] [--tiny]

1. train: GPT-2 124M (model.presets "gpt2", dropout 0) on random tokens, fp32 master
   weights, bf16 autocast, the engine's AdamW (fused), clip 1.0; median step time after
   warm-up, tokens/s and MFU = model.flops.flops_per_token x tokens/s / the device's bf16
   peak (parallel.peak; llm.c reaches about 50% on A100/H100).
2. generate: the same model in bf16, greedy, KV cache (model.generate), 16-token prompts,
   --gen-tokens new tokens per row at each batch size: new tokens/s.
3. ppo: one iteration of a tiny actor + critic + frozen reference on a toy reward (share of
   even token ids): sample, score, KL-shaped rewards, GAE, one clipped policy + value step
   (rl.ppo_math), timed per phase.

Without CUDA it says so in one line and runs the same code on the CPU with a tiny model
(--tiny is then implied), so the script is tested where no GPU is.
The package need not be installed: run from the repository root, it maps the folders.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _trellis_importable() -> None:
    """`trellis.<folder>` from the checkout when the package is not installed (setup.py maps
    trellis.X to the folder X)."""
    try:
        importlib.import_module("trellis.model")
    except ImportError:
        pkg = types.ModuleType("trellis")
        pkg.__path__ = [str(ROOT)]
        sys.modules["trellis"] = pkg


_trellis_importable()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trellis.model.build import build_model  # noqa: E402
from trellis.model.config import ModelConfig  # noqa: E402
from trellis.model.flops import count_params, flops_per_token  # noqa: E402
from trellis.model.generate import GenerationConfig, generate  # noqa: E402
from trellis.model.heads import ValueModel  # noqa: E402
from trellis.model.losses import token_cross_entropy  # noqa: E402
from trellis.parallel.config import OptimConfig  # noqa: E402
from trellis.parallel.engine import adamw, param_groups  # noqa: E402
from trellis.parallel.peak import peak_flops  # noqa: E402

TINY = {"n_layer": 2, "n_head": 2, "d_model": 64, "vocab_size": 512, "max_seq_len": 128}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


# ---- 1. training ---------------------------------------------------------------------------
def bench_train(cfg: ModelConfig, dev: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    opt = adamw(param_groups(model, 0.1), OptimConfig(lr=6e-4, betas=[0.9, 0.95]))
    fwd = torch.compile(model) if args.compile else model
    B, T = args.batch, args.seq
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev, generator=g)  # (B, T+1)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = token_cross_entropy(fwd(x[:, :-1]), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = [timed(step, dev) for _ in range(args.steps)]
    med = statistics.median(times)
    tps = B * T / med
    peak = peak_flops(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "bf16")
    mfu = f"MFU {100 * flops_per_token(cfg, T) * tps / peak:.1f}%" if peak else \
        "MFU n/a (no peak known for this device)"
    print(f"train: {count_params(model) / 1e6:.1f}M params, {B} x {T} tokens/step, bf16 "
          f"autocast{' + compile' if args.compile else ''}: median step {1e3 * med:.1f} ms "
          f"[{1e3 * min(times):.1f}..{1e3 * max(times):.1f}], {tps:,.0f} tokens/s, {mfu}",
          flush=True)


# ---- 2. generation -------------------------------------------------------------------------
@torch.no_grad()
def bench_generate(cfg: ModelConfig, dev: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).to(dev, dtype=torch.bfloat16).eval()
    gen = GenerationConfig(max_new_tokens=args.gen_tokens, stop_early=False)
    for B in [int(b) for b in args.gen_batches.split(",")]:
        prompt = torch.randint(10, cfg.vocab_size, (B, 16), device=dev)
        mask = torch.ones_like(prompt)
        generate(model, prompt[:, :4], mask[:, :4], GenerationConfig(max_new_tokens=2))  # warm
        dt = timed(lambda: generate(model, prompt, mask, gen), dev)
        print(f"generate: batch {B:4d}, {args.gen_tokens} new tokens/row (KV cache, bf16, "
              f"greedy): {B * args.gen_tokens / dt:,.0f} tokens/s ({dt:.2f} s)", flush=True)


# ---- 3. one PPO iteration ------------------------------------------------------------------
def bench_ppo(dev: torch.device, B: int = 32, P: int = 8, N: int = 24) -> None:
    from trellis.rl.ppo_math import gae, masked_whiten, policy_loss, shaped_rewards, \
        token_logprobs, value_loss
    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    actor = build_model(cfg).to(dev)
    ref = copy.deepcopy(actor).eval().requires_grad_(False)
    critic = ValueModel(build_model(cfg)).to(dev)
    opt_a = adamw(param_groups(actor, 0.0), OptimConfig(lr=1e-4))
    opt_c = adamw(param_groups(critic, 0.0), OptimConfig(lr=1e-4))
    prompt = torch.randint(10, cfg.vocab_size, (B, P), device=dev)
    phases: dict[str, float] = {}

    def phase(name: str, fn):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        phases[name] = time.perf_counter() - t0
        return out

    g = torch.Generator(device=dev).manual_seed(0)
    out = phase("generate", lambda: generate(actor, prompt, torch.ones_like(prompt),
                                             GenerationConfig(max_new_tokens=N, do_sample=True),
                                             generator=g))
    seq = torch.cat([prompt, out.tokens], 1)  # (B, P+N)
    mask = out.mask.float()  # (B, N)

    def resp_logp(model) -> torch.Tensor:  # logits at P-1.. predict the response tokens
        return token_logprobs(model(seq)[:, P - 1:-1], out.tokens)

    with torch.no_grad():
        old_logp, ref_logp = phase("score", lambda: (resp_logp(actor), resp_logp(ref)))
        old_v = critic(seq)[:, P - 1:-1]
    scores = ((out.tokens % 2 == 0).float() * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    rewards, kl = shaped_rewards(scores, old_logp, ref_logp, mask, beta=0.05)
    adv, returns = gae(rewards, old_v, mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask)

    def update() -> dict[str, float]:
        pl, stats = policy_loss(resp_logp(actor), old_logp, adv, mask)
        pl.backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        vl, vstats = value_loss(critic(seq)[:, P - 1:-1], old_v, returns, mask)
        vl.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        return stats | vstats
    stats = phase("update", update)
    total = sum(phases.values())
    print(f"ppo: one iteration, {B} prompts x {N} new tokens, tiny actor/critic/reference "
          f"in-process: {total:.3f} s (" + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
          + f"); score {float(scores.mean()):.3f}, kl {float(kl.sum(1).mean()):.4f}, "
          f"policy_loss {stats['policy_loss']:.4f}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training model")
    ap.add_argument("--gen-batches", default="1,32,256")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of GPT-2 124M")
    ap.add_argument("--only", choices=["train", "generate", "ppo"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    else:
        dev = torch.device("cpu")
        print("no CUDA GPU here: CPU fallback with a tiny model (these are not GPU figures)",
              flush=True)
        args.tiny = True
        args.seq = min(args.seq, TINY["max_seq_len"])
        args.gen_tokens = min(args.gen_tokens, 32)
    cfg = ModelConfig.from_preset("gpt2", **(TINY if args.tiny else {}), dropout=0.0)
    if args.seq > cfg.max_seq_len or 16 + args.gen_tokens > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} / 16 + --gen-tokens {args.gen_tokens} exceed the "
                         f"model's max_seq_len {cfg.max_seq_len}")
    if args.only in (None, "train"):
        bench_train(cfg, dev, args)
    if args.only in (None, "generate"):
        bench_generate(cfg, dev, args)
    if args.only in (None, "ppo"):
        bench_ppo(dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
