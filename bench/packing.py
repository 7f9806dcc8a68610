"""Fine-tuning tokens/s with padded vs packed batches (`data.packing`); prints, never asserts.

trellis `sft` and `rm` (launcher/jobs/finetune) in-process (local=True) on the embedded demo
task's demonstrations and ranked comparisons, tokenized by a SentencePiece BPE (vocab 512)
trained on the demo corpus, from one random-init GPT (4 layers, d_model 128, context 64: the
pipeline's default size). Each (kind, rows per step) runs padded and packed on the same rows
in the same order (same seed, no held-out split), alternating which goes first per round.

tokens/s = the job's own count (SFT: response tokens with a target; RM: every real token) /
its worker-side step time, median over steps 2..N and then over rounds. The rows are the
same on both sides, so the ratio packed/padded is the step-time ratio. Separate jobs are
at the mercy of a shared machine's load, so `fwd+bwd ratio` also times the model's forward
and backward alone on the same rows, padded and packed alternating batch by batch in one
process (median over batches). `positions/token` is the batch positions the model computes
per real token (1.00 = no padding), padded -> packed, from the rows of each step replayed
through both collators.

    python bench/packing.py [--steps 30] [--batch 8 32] [--rounds 2] [--max-len 48]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRELLIS_PROGRESS", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/pretrain.py

import torch  # noqa: E402

from trellis.data_pipeline.collate import PairCollator, SFTCollator  # noqa: E402
from trellis.data_pipeline.packed_collate import (PackedPairCollator,  # noqa: E402
                                                  PackedSFTCollator)
from trellis.data_pipeline.row_stream import RowStream  # noqa: E402
from trellis.data_pipeline.structured import StructuredDataset  # noqa: E402
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402
from trellis.launcher.config_loader import load_config  # noqa: E402
from trellis.launcher.jobs.finetune.config import RMJobConfig, SFTJobConfig  # noqa: E402
from trellis.launcher.jobs.finetune.driver import rm, sft  # noqa: E402
from trellis.model.build import build_model  # noqa: E402
from trellis.model.config import ModelConfig  # noqa: E402
from trellis.model.io import save_module  # noqa: E402
from trellis.rl.demo_task import DemoTaskConfig, write_demo_data, write_pretrain_corpus  # noqa: E402

KINDS = {"sft": (sft, SFTJobConfig, "demonstrations", SFTCollator, PackedSFTCollator),
         "rm": (rm, RMJobConfig, "comparisons", PairCollator, PackedPairCollator)}
MAX_PROMPT = 24


def make_assets(root: Path, rows: int) -> dict[str, Path]:
    """Demo rows, a tokenizer trained on the demo corpus, random-init GPT weights with it."""
    data = write_demo_data(root / "data", DemoTaskConfig(n_demonstrations=rows,
                                                         n_comparison_prompts=rows,
                                                         n_train_prompts=10, n_eval_prompts=10))
    corpus = write_pretrain_corpus(root / "corpus", 2000)
    tok = train_tokenizer(TokenizerConfig(vocab_size=512), [corpus.read_text()],
                          root / "tokenizer.model")
    cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=128,
                      max_seq_len=64)
    torch.manual_seed(0)
    init = save_module(build_model(cfg, "lm"), cfg, "lm", root / "init")
    (init / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    return {"init": init, **data}


def run(kind: str, assets: dict[str, Path], run_dir: Path, batch: int, packing: bool,
        args: argparse.Namespace) -> dict[str, Any]:
    job, cls, source, *_ = KINDS[kind]
    cfg = load_config(cls, None, [
        f"run_dir={run_dir}", f"init_from={assets['init']}", f"data.train={assets[source]}",
        "data.val_fraction=0", f"data.max_len={args.max_len}", f"data.max_prompt_len={MAX_PROMPT}",
        f"data.packing={str(packing).lower()}", f"parallel.micro_batch_size={batch}",
        "parallel.precision=fp32", "metrics.port=-1", f"train.steps={args.steps}", "train.log_every=1",
        "train.eval_every=0", "checkpoint.resume=false"])
    job(cfg, local=True)
    with open(run_dir / "metrics" / "train.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    rates = [r["tokens_per_second"] for r in rows]
    return {"tokens_per_second": statistics.median(rates[1:] or rates),
            "loss": rows[-1]["loss"], "run_dir": run_dir}


def positions_per_token(kind: str, run_dir: Path, batch: int, steps: int, max_len: int
                        ) -> tuple[float, float]:
    """(padded, packed) batch positions computed per real token over the job's rows."""
    *_, padded, packed = KINDS[kind]
    out = []
    for collate in (padded(max_len, MAX_PROMPT), packed(max_len, MAX_PROMPT)):
        it = iter(RowStream(StructuredDataset(run_dir / "data" / "train"), batch, seed=0))
        masks = [collate(next(it))["attention_mask"] for _ in range(steps)]
        out.append(sum(m.numel() for m in masks) / sum(int(m.sum()) for m in masks))
    return out[0], out[1]


def interleaved(kind: str, init: Path, run_dir: Path, batch: int, args: argparse.Namespace
                ) -> float:
    """Packed/padded tokens/s of forward + backward alone on the job's rows, the two
    alternating batch by batch in one process (a shared machine's load hits both alike):
    the median over batches of padded time / packed time."""
    from trellis.model.io import load_module
    from trellis.model.losses import token_cross_entropy
    *_, padded, packed = KINDS[kind]
    model = load_module(init, head="lm" if kind == "sft" else "score")[0].train()
    it = iter(RowStream(StructuredDataset(run_dir / "data" / "train"), batch, seed=0))
    ratios = []
    for _ in range(args.steps):
        rows = next(it)
        spent = []
        for collate in (padded(args.max_len, MAX_PROMPT), packed(args.max_len, MAX_PROMPT)):
            b = collate(rows)
            kw = {k: b[k] for k in ("attention_mask", "segment_ids", "score_index") if k in b}
            t0 = time.perf_counter()
            out = model(b["input_ids"], **kw)
            loss = token_cross_entropy(out, b["labels"]) if kind == "sft" else out.sum()
            loss.backward()
            spent.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        ratios.append(spent[0] / spent[1])
    return statistics.median(ratios[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32],
                    help="rows per step: demonstrations (sft), ranked prompts (rm)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=48, help="data.max_len = the block budget")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps, "
          f"{args.rounds} rounds, max_len {args.max_len}, fp32; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="trellis-bench-pack-", dir="/tmp") as tmp:
        root = Path(tmp)
        assets = make_assets(root, max(200, max(args.batch) * args.steps))
        for kind in KINDS:
            for batch in args.batch:
                rates: dict[bool, list[float]] = {False: [], True: []}
                losses: dict[bool, float] = {}
                for rnd in range(args.rounds):
                    for packing in ((False, True) if rnd % 2 == 0 else (True, False)):
                        r = run(kind, assets, root / f"{kind}-{batch}-{rnd}-{packing}", batch,
                                packing, args)
                        rates[packing].append(r["tokens_per_second"])
                        losses[packing] = r["loss"]
                pos = positions_per_token(kind, r["run_dir"], batch, args.steps, args.max_len)
                fwd_bwd = interleaved(kind, assets["init"], r["run_dir"], batch, args)
                results.append((kind, batch, rates, losses, pos, fwd_bwd))
    print(f"\n{'':<4}{'rows':>5}{'padded tok/s':>14}{'packed tok/s':>14}{'ratio':>8}"
          f"{'per round':>16}{'fwd+bwd ratio':>15}{'positions/token':>18}{'final loss':>22}")
    for kind, batch, rates, losses, pos, fwd_bwd in results:
        pad, pack = statistics.median(rates[False]), statistics.median(rates[True])
        rounds = " ".join(f"{b / a:.2f}" for a, b in zip(rates[False], rates[True]))
        print(f"{kind:<4}{batch:>5}{pad:>14,.0f}{pack:>14,.0f}{pack / pad:>7.2f}x{rounds:>16}"
              f"{fwd_bwd:>14.2f}x{pos[0]:>10.2f} -> {pos[1]:.2f}"
              f"{losses[False]:>11.4f} / {losses[True]:.4f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
