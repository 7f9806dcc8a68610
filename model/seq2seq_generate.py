"""Translation with an encoder-decoder (model/seq2seq.py): greedy decoding and beam search,
both over a Seq2SeqCache (the source is encoded once; each step feeds one target token).

Beam search follows fairseq: each step ranks 2K candidates of the K live hypotheses; an EOS
among the first K ranks finishes a hypothesis, scored by its summed log-probability divided
by length^length_penalty (length counts the EOS); the first K other candidates live on. A
source is done when K hypotheses have finished (so beam 1 is greedy); at max_new_tokens the
live ones are finished as they stand. Outputs are token lists without BOS and EOS.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trellis.model.seq2seq import Seq2SeqCache


@dataclass
class TranslateConfig:
    max_new_tokens: int = field(default=64, metadata={"min": 1})
    """Most target tokens generated per source (EOS included)."""
    beam_size: int = field(default=1, metadata={"min": 1, "max": 64})
    """Hypotheses kept per source; 1 = greedy."""
    length_penalty: float = field(default=1.0, metadata={"min": 0.0, "max": 5.0})
    """Finished hypotheses rank by log-prob / length^length_penalty (0 = raw sum)."""
    bos_id: int = field(default=2, metadata={"min": 0})
    """First decoder input (trellis tokenizers: <s> = 2)."""
    eos_id: int = field(default=3, metadata={"min": 0})
    """Ends a translation (trellis tokenizers: </s> = 3)."""
    pad_id: int = field(default=0, metadata={"min": 0})
    """Fed to finished rows."""
    stop_early: bool = True
    """Stop when every source is done. Set False when several ZeRO-3 ranks decode together:
    every rank must run the same number of forwards or the gathers hang."""


def _check(model: nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
           cfg: TranslateConfig) -> None:
    if src_ids.shape != src_mask.shape or src_ids.dim() != 2:
        raise ValueError(f"source ids {tuple(src_ids.shape)} and mask {tuple(src_mask.shape)} "
                         f"must be the same (B, S) shape")
    if cfg.max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"max_new_tokens {cfg.max_new_tokens} exceeds max_seq_len "
                         f"{model.config.max_seq_len}")


@torch.no_grad()
def translate(model: nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
              cfg: TranslateConfig) -> list[list[int]]:
    """Right-padded sources (B, S) -> B target token lists (greedy when beam_size is 1)."""
    search = greedy_search if cfg.beam_size == 1 else beam_search
    return search(model, src_ids, src_mask, cfg)


def _eval_mode(fn):
    def run(model: nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
            cfg: TranslateConfig) -> list[list[int]]:
        _check(model, src_ids, src_mask, cfg)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, src_ids, src_mask, cfg)
        finally:
            model.train(was_training)
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


@_eval_mode
def greedy_search(model: nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
                  cfg: TranslateConfig) -> list[list[int]]:
    """The most likely next token at every step, until EOS or max_new_tokens."""
    B, N, dev = src_ids.shape[0], cfg.max_new_tokens, src_ids.device
    memory = model.encode(src_ids, src_mask)  # (B, S, C)
    cache = Seq2SeqCache(N)
    tok = torch.full((B,), cfg.bos_id, dtype=torch.long, device=dev)
    out = torch.full((B, N), cfg.pad_id, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(N):
        logits = model.decode(tok[:, None], memory, src_mask, cache)[:, -1]  # (B, V)
        tok = logits.argmax(-1).masked_fill(finished, cfg.pad_id)
        out[:, t] = tok
        finished = finished | (tok == cfg.eos_id)
        if cfg.stop_early and bool(finished.all()):
            break
    return [_strip(row, cfg) for row in out.tolist()]


def _strip(tokens: list[int], cfg: TranslateConfig) -> list[int]:
    """Tokens before the first EOS (padding after it dropped)."""
    return tokens[:tokens.index(cfg.eos_id)] if cfg.eos_id in tokens else tokens


@_eval_mode
def beam_search(model: nn.Module, src_ids: torch.Tensor, src_mask: torch.Tensor,
                cfg: TranslateConfig) -> list[list[int]]:
    """Beam search of width cfg.beam_size (see the module docstring)."""
    B, K, N, dev = src_ids.shape[0], cfg.beam_size, cfg.max_new_tokens, src_ids.device
    memory = model.encode(src_ids, src_mask).repeat_interleave(K, dim=0)  # (B*K, S, C)
    mask = src_mask.repeat_interleave(K, dim=0)  # (B*K, S)
    cache = Seq2SeqCache(N)
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=dev)  # generated so far
    last = torch.full((B * K,), cfg.bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # K copies of one start: expand only the first
    finals: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for t in range(N):
        logp = F.log_softmax(model.decode(last[:, None], memory, mask, cache)[:, -1].float(),
                             dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        scores, parent, new_tok = _select(top_s, top_i // V, top_i % V, tokens, finals, t, cfg)
        if t == N - 1 or (cfg.stop_early and all(len(f) >= K for f in finals)):
            break
        order = (torch.arange(B, device=dev)[:, None] * K + parent).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[order], new_tok.view(-1, 1)], dim=1)
        cache.reorder(order)
        last = new_tok.view(-1)
    if t == N - 1:  # sources still open: their live hypotheses end here
        order = (torch.arange(B, device=dev)[:, None] * K + parent).view(-1)
        tokens = torch.cat([tokens[order], new_tok.view(-1, 1)], dim=1)
        for b in range(B):
            for k in range(K):
                s = float(scores[b, k])
                if len(finals[b]) < K and s > float("-inf"):
                    finals[b].append((_norm(s, N, cfg), tokens[b * K + k].tolist()))
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finals]


def _norm(score: float, length: int, cfg: TranslateConfig) -> float:
    return score / (length ** cfg.length_penalty)


def _select(top_s: torch.Tensor, parent: torch.Tensor, tok: torch.Tensor, tokens: torch.Tensor,
            finals: list[list[tuple[float, list[int]]]], t: int, cfg: TranslateConfig
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step t's candidates (B, 2K), best first -> finished hypotheses appended to `finals`;
    the next live scores, parents and tokens (B, K). Done sources get -inf scores."""
    B, K = len(finals), tokens.shape[0] // len(finals)
    scores = torch.full((B, K), float("-inf"), device=top_s.device)
    parents = torch.zeros(B, K, dtype=torch.long, device=top_s.device)
    new_tok = torch.full((B, K), cfg.pad_id, dtype=torch.long, device=top_s.device)
    s_l, p_l, w_l = top_s.tolist(), parent.tolist(), tok.tolist()
    for b in range(B):
        if len(finals[b]) >= K:
            continue
        live = 0
        for j, (s, k, w) in enumerate(zip(s_l[b], p_l[b], w_l[b])):
            if s == float("-inf") or live == K:
                break
            if w == cfg.eos_id:
                if j < K:
                    finals[b].append((_norm(s, t + 1, cfg), tokens[b * K + k].tolist()))
                continue
            scores[b, live], parents[b, live], new_tok[b, live] = s, k, w
            live += 1
    return scores, parents, new_tok
