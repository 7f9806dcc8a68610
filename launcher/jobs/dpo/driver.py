"""`trellis dpo`: direct preference optimisation of a policy on ranked comparisons (the RM's
data: K-way rankings give all their pairs), against a frozen reference that is its own
worker group, or whose log-probs are computed once before training (dpo.reference).

The driver owns the row order (saved inside the policy's checkpoints), deals each step's
rows to the policy ranks, asks the reference for their log-probs, and logs the loss, the
implicit-reward margin and accuracy, and the chosen/rejected log-probs; held-out pairs are
evaluated at the start, every train.eval_every steps and at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, copy_tokenizer
from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, resolve_config
from trellis.launcher.jobs.dpo.config import DPOJobConfig
from trellis.launcher.jobs.dpo.data import IndexedRows, chunks, dpo_batch, to_arrow

WORKER = "trellis.rl.dpo_worker:DPOWorker"
REF_FILE = "reference_logps.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)


def prepare(cfg: DPOJobConfig) -> dict[str, Any]:
    """Weights, tokenizer, ingested comparisons and the train/val split, once per job."""
    from trellis.data_pipeline.row_stream import split_rows
    from trellis.data_pipeline.structured import StructuredDataset
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.jobs.finetune.driver import prepare_rows
    from trellis.launcher.weights import materialize, write_run_model
    from trellis.model.io import read_meta

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = materialize(cfg.policy_init, run_dir / "init" / "policy")
    ref = materialize(cfg.reference_init, run_dir / "init" / "reference") \
        if cfg.reference_init else policy
    toks = {}
    for key, w in (("policy_init", policy), ("reference_init", ref)):
        if not (w / TOKENIZER_FILE).is_file():
            raise ConfigError(f"config key '{key}': no tokenizer.model with the weights at {w}")
        toks[key] = Tokenizer(w / TOKENIZER_FILE)
    if toks["policy_init"].sha256 != toks["reference_init"].sha256:
        raise ConfigError("config key 'reference_init': trained with another tokenizer than "
                          "policy_init")
    tok = toks["policy_init"]
    meta = read_meta(policy)["model"]
    d = cfg.dpo
    if d.max_prompt_len + d.max_response_len > meta["max_seq_len"]:
        raise ConfigError(f"config key 'dpo.max_prompt_len': {d.max_prompt_len} + "
                          f"dpo.max_response_len {d.max_response_len} exceeds the model's "
                          f"context {meta['max_seq_len']}")
    train = prepare_rows(cfg.data.train, "comparisons", tok, run_dir / "data" / "train")
    ds = StructuredDataset(train, tok.sha256, meta["vocab_size"])
    if cfg.data.val:
        val_ds = StructuredDataset(prepare_rows(cfg.data.val, "comparisons", tok,
                                                run_dir / "data" / "val"),
                                   tok.sha256, meta["vocab_size"])
        train_rows, val_rows = list(range(len(ds))), list(range(len(val_ds)))
    else:
        val_ds = ds
        train_rows, val_rows = split_rows(len(ds), cfg.data.val_fraction, cfg.data.seed)
    if len(train_rows) < d.prompts_per_step:
        raise ConfigError(f"config key 'data.train': {len(train_rows)} training rows are too "
                          f"few for dpo.prompts_per_step {d.prompts_per_step}")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    copy_tokenizer(tok.path, run_dir)
    write_run_model(run_dir, meta, "lm")  # the run dir loads as a policy (like an SFT run)
    return {"run_dir": run_dir, "policy": policy, "reference": ref, "tokenizer": tok,
            "train": IndexedRows(ds), "val": IndexedRows(val_ds), "train_rows": train_rows,
            "val_rows": val_rows[:d.eval_rows]}


def _spec(cfg: DPOJobConfig, prep: dict[str, Any], role: str) -> Any:
    from trellis.parallel.placement import RoleSpec
    rc, trainable = getattr(cfg, role), role == "policy"
    kw = {"init_dir": str(prep[role]), "dpo": dataclasses.asdict(cfg.dpo),
          "par": dataclasses.asdict(rc.parallel),
          "optim": dataclasses.asdict(rc.optim) if trainable else None,
          "total_steps": cfg.train.steps if trainable else 0,
          "rows_per_rank": cfg.dpo.prompts_per_step // rc.parallel.num_workers,
          "run_dir": str(prep["run_dir"] if trainable else prep["run_dir"] / "reference"),
          "seed": cfg.seed, "keep_last": cfg.checkpoint.keep_last}
    return RoleSpec(WORKER, rc.parallel, kw)


def _split_by_row(lp: torch.Tensor, rows: list[dict]) -> list[list[float]]:
    counts = [len(r["responses_ids"]) for r in rows]
    return [x.tolist() for x in torch.split(lp, counts)]


def _reference_key(cfg: DPOJobConfig, prep: dict[str, Any]) -> dict[str, Any]:
    from trellis.launcher.weights import source_fingerprint
    d = cfg.dpo
    return {"reference": source_fingerprint(prep["reference"]), "train": cfg.data.train,
            "val": cfg.data.val, "average": d.loss_type == "ipo",
            "max_prompt_len": d.max_prompt_len, "max_response_len": d.max_response_len}


def precompute_reference(cfg: DPOJobConfig, prep: dict[str, Any], local: bool,
                         address: str | None) -> dict[str, dict[int, list[float]]]:
    """Reference log-probs of every train and held-out row ({split: {row: [per response]}}),
    from a reference group started for this and stopped after; kept in RUN_DIR/REF_FILE
    (plain JSON) and reused while its key (weights, data, lengths) matches."""
    from trellis.parallel.placement import RoleGroups
    path, key = prep["run_dir"] / REF_FILE, _reference_key(cfg, prep)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return {s: {int(k): v for k, v in t.items()} for s, t in saved["rows"].items()}
    t0 = time.perf_counter()
    groups = RoleGroups.start({"reference": _spec(cfg, prep, "reference")}, colocate=False,
                              local=local, address=address, name="dpo-reference")
    out: dict[str, dict[int, list[float]]] = {}
    try:
        ref = groups.reference
        per = max(1, cfg.dpo.prompts_per_step // ref.world_size) * ref.world_size
        for split, ds, idx in (("train", prep["train"], prep["train_rows"]),
                               ("val", prep["val"], prep["val_rows"])):
            out[split] = {}
            for i in range(0, len(idx), per):
                block = idx[i:i + per]
                rows = ds.rows(block + [block[0]] * (per - len(block)))  # equal work per rank
                parts = chunks(rows, ref.world_size)
                res = ref.call_scatter("logprobs", [to_arrow(_seq(p, cfg)) for p in parts])
                for part, rb in zip(parts, res):
                    lp = torch.from_numpy(rb.column("ref_logps").to_numpy().copy())
                    for r, v in zip(part, _split_by_row(lp, part)):
                        out[split][r["row"]] = v
    finally:
        groups.shutdown()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rows": out}))
    with open(tmp) as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    print(f"dpo: reference log-probs of {sum(len(v) for v in out.values())} rows computed in "
          f"{time.perf_counter() - t0:.1f}s ({path})", flush=True)
    return out


def _seq(rows: list[dict], cfg: DPOJobConfig) -> dict[str, torch.Tensor]:
    d = cfg.dpo
    return dpo_batch(rows, d.max_prompt_len, d.max_response_len, d.weighting)[0]


class DPOSession:
    """DPO on the driver loop: the policy group (and the reference group) and the row order."""
    name, metrics_kind = "dpo", "dpo"

    def __init__(self, cfg: DPOJobConfig, prep: dict[str, Any], table: dict | None,
                 metrics: Any, local: bool, address: str | None, resume: bool):
        from trellis.data_pipeline.row_stream import RowStream
        from trellis.parallel.placement import RoleGroups

        self.cfg, self.prep, self.table, self.metrics, self.resume = cfg, prep, table, metrics, resume
        specs = {"policy": _spec(cfg, prep, "policy")}
        if table is None:
            specs["reference"] = _spec(cfg, prep, "reference")
        self.groups = RoleGroups.start(specs, colocate=cfg.placement == "colocate" and
                                       len(specs) > 1, local=local, address=address, name="dpo")
        self.stream = RowStream(prep["train"], cfg.dpo.prompts_per_step, seed=cfg.seed,
                                rows=prep["train_rows"])
        self._it = iter(self.stream)
        self.start_eval: dict[str, float] = {}

    # ---- batches -------------------------------------------------------------------------
    def _batches(self, rows: list[dict], split: str) -> tuple[list[tuple], float]:
        """Per policy rank: (responses + reference log-probs, pairs) as Arrow; also the
        reference group's seconds (0 when precomputed)."""
        d, world = self.cfg.dpo, self.groups.policy.world_size
        parts = chunks(rows, world)
        made = [dpo_batch(p, d.max_prompt_len, d.max_response_len, d.weighting) for p in parts]
        if self.table is None:
            res = self.groups.reference.call_scatter("logprobs", [to_arrow(s) for s, _ in made])
            refs = [torch.from_numpy(rb.column("ref_logps").to_numpy().copy()) for rb in res]
            secs = max(float((rb.schema.metadata or {}).get(b"seconds", b"0")) for rb in res)
        else:
            refs = [torch.tensor([v for r in p for v in self.table[split][r["row"]]])
                    for p in parts]
            secs = 0.0
        return [(to_arrow(s | {"ref_logps": ref.float()}), to_arrow(pr))
                for (s, pr), ref in zip(made, refs)], secs

    # ---- the loop's session protocol ------------------------------------------------------
    def start(self) -> int:
        from trellis.parallel import checkpoint
        path = checkpoint.latest_complete(self.prep["run_dir"]) if self.resume else None
        step = self.groups.policy.call("resume", str(path) if path else None)[0]
        if path:
            self.stream.load_state_dict(self.groups.policy.call("driver_state")[0]["rows"])
            self._it = iter(self.stream)
        d = self.cfg.dpo
        print(f"dpo: {d.loss_type} beta {d.beta} label_smoothing {d.label_smoothing}, "
              f"{d.prompts_per_step} prompts/step, policy x{self.cfg.policy.parallel.num_workers}"
              f", reference {'precomputed' if self.table is not None else 'group x%d' % self.cfg.reference.parallel.num_workers}"
              + (f"; resumed from {path}" if path else ""), flush=True)
        if not path:
            self.start_eval = self.evaluate(0)
            if self.start_eval:
                self.metrics.log(0, self.start_eval, kind="dpo_eval")
        return step

    def train_step(self, step: int) -> tuple[dict[str, float], dict[str, float]]:
        t0 = time.perf_counter()
        batches, ref_s = self._batches(next(self._it), "train")
        t1 = time.perf_counter()
        row = self.groups.policy.call_scatter("train_pairs", batches)[0]
        wall = time.perf_counter() - t0
        row |= {"pairs_per_second": row["pairs"] / wall}
        return row, {"reference": ref_s, "reference_wall": t1 - t0,
                     "train": time.perf_counter() - t1}

    def describe(self, step: int, r: dict[str, float]) -> str:
        return (f"step {step}: loss {r['loss']:.4f} accuracy {r['accuracy']:.3f} margin "
                f"{r['reward_margin']:.3f} logps chosen {r['chosen_logps']:.2f} rejected "
                f"{r['rejected_logps']:.2f} {r['pairs_per_second']:.1f} pairs/s")

    def evaluate(self, step: int) -> dict[str, float]:
        world = self.groups.policy.world_size
        idx = self.prep["val_rows"][:len(self.prep["val_rows"]) // world * world]
        if not idx:
            return {}
        batches, _ = self._batches(self.prep["val"].rows(idx), "val")
        return self.groups.policy.call_scatter("evaluate_pairs", batches)[0]

    def save(self, step: int) -> None:
        self.groups.policy.call("set_driver_state", {"rows": self.stream.state_dict()})
        self.groups.policy.call("save", step)

    def finish(self, last: dict[str, Any]) -> dict[str, Any]:
        end = self.evaluate(last["step"])
        if end:
            self.metrics.log(last["step"], end, kind="dpo_eval")
            print("eval end: " + " ".join(f"{k} {v:.4f}" for k, v in end.items()), flush=True)
        return {"start_eval": self.start_eval, "end_eval": end,
                "info": {r: g.call("info") for r, g in self.groups.items()}}

    def shutdown(self) -> None:
        self.groups.shutdown()


def dpo(cfg: DPOJobConfig, local: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run DPO on the driver loop (with recovery); returns start/end held-out evaluations,
    the last step's metrics and each group's engine info."""
    from trellis.cluster.metrics import MetricsLogger
    from trellis.launcher.driver_loop import run_loop

    cpu_defaults()
    if local:
        bad = [r for r in ("policy", "reference") if getattr(cfg, r).parallel.num_workers != 1]
        if bad:
            raise ConfigError(f"config key '{bad[0]}.parallel.num_workers': --local runs one "
                              f"worker per group")
    prep = prepare(cfg)
    table = precompute_reference(cfg, prep, local, address) \
        if cfg.dpo.reference == "precompute" else None
    metrics = MetricsLogger(prep["run_dir"], cfg.metrics, role="driver")
    try:
        return run_loop(lambda resume: DPOSession(cfg, prep, table, metrics, local, address,
                                                  resume),
                        cfg.train, cfg.checkpoint, metrics)
    finally:
        metrics.close()


def is_done(cfg: DPOJobConfig) -> bool:
    from trellis.parallel.checkpoint import is_complete
    return is_complete(cfg.run_dir, cfg.train.steps)


def run(args: argparse.Namespace) -> int:
    res = dpo(resolve_config(DPOJobConfig, args), local=args.local, address=args.address)
    for name in ("start_eval", "end_eval"):
        ev = res.get(name) or {}
        if ev:
            print(f"{name}: held-out accuracy {ev['accuracy']:.3f} margin "
                  f"{ev['reward_margin']:.3f} loss {ev['loss']:.4f}")
    return 0
