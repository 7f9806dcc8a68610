"""The rank of `trellis eval`: a frozen engine over the model; scores the chunks of requests
dealt to it. Chunks are fixed before dealing (same contents whatever the world size), so a
data-parallel run computes what --local computes."""
from __future__ import annotations

from pathlib import Path

import torch

from trellis.model.generate import GenerationConfig, generate
from trellis.model.io import load_module
from trellis.model.scoring import loglikelihoods
from trellis.parallel.config import ParallelConfig
from trellis.parallel.engine_worker import EngineWorker

Request = tuple[list[int], list[int]]


class EvalWorker(EngineWorker):
    def __init__(self, rank: int, world_size: int, model_dir: str, parallel: dict, run_dir: str):
        model, cfg, _ = load_module(model_dir)
        if cfg.arch != "gpt":
            raise ValueError(f"'{model_dir}' is a {cfg.arch} model; trellis eval scores causal "
                             f"LMs (GPT)")
        self.max_len = cfg.max_seq_len
        par = ParallelConfig(**parallel)
        self._setup(rank, world_size, model.eval(), par, None, 1, Path(run_dir), cfg.max_seq_len)
        self.many_ranks_zero3 = world_size > 1 and self.engine.zero_stage == 3

    def loglikelihood(self, chunks: list[list[Request]]) -> list[list[tuple[float, bool]]]:
        self.engine.eval()
        return [loglikelihoods(self.engine.module, chunk) for chunk in chunks]

    @torch.no_grad()
    def generate(self, chunks: list[list[list[int]]], max_new_tokens: int, eos_id: int,
                 pad_id: int = 0) -> list[list[list[int]]]:
        """Greedy continuations (token ids, EOS and after dropped) of left-padded prompts."""
        self.engine.eval()
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                               stop_early=not self.many_ranks_zero3)
        out = []
        for chunk in chunks:
            P = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), P), pad_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), P, dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
            g = generate(self.engine.module, ids.to(self.device), mask.to(self.device), cfg)
            rows = []
            for toks, m in zip(g.tokens.tolist(), g.mask.tolist()):
                kept = [t for t, k in zip(toks, m) if k]
                rows.append(kept[:-1] if kept and kept[-1] == eos_id else kept)
            out.append(rows)
        return out
