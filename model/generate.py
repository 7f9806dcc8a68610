"""Batched autoregressive generation with a KV cache (greedy, temperature, top-k, top-p)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trellis.model.kv_cache import KVCache


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    """Most tokens generated per prompt."""
    do_sample: bool = False
    """Sample from the filtered distribution; False = greedy (argmax)."""
    temperature: float = field(default=1.0, metadata={"min": 1e-6})
    """Logits are divided by this before softmax (also for the returned log-probs)."""
    top_k: int = field(default=0, metadata={"min": 0})
    """Sample among the k most likely tokens; 0 = no limit."""
    top_p: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    """Nucleus sampling: the smallest set of tokens with probability >= top_p; 1 = off."""
    eos_id: int = field(default=3, metadata={"min": 0})
    """A row stops after generating this token (it is kept, with mask 1)."""
    pad_id: int = field(default=0, metadata={"min": 0})
    """Filler after EOS."""
    stop_early: bool = True
    """Stop when every row has finished. Set False when several ZeRO-3 ranks generate
    together: every rank must run the same number of forwards or the gathers hang."""


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) long, pad_id after EOS; N <= max_new_tokens
    logprobs: torch.Tensor  # (B, N) float32, log p(token) at temperature, 0 at padding
    mask: torch.Tensor  # (B, N) long, 1 for generated tokens incl. EOS, 0 after


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside top-k / nucleus top-p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V)
        # Drop a token when the tokens before it already reach top_p (the first one stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(logits: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) last-position logits -> next token (B,), its log-prob (B,) at temperature."""
    scaled = logits.float() / cfg.temperature
    logp = F.log_softmax(scaled, dim=-1)  # before filtering: what PPO recomputes
    if cfg.do_sample:
        probs = filter_logits(scaled, cfg.top_k, cfg.top_p).softmax(-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        tok = scaled.argmax(-1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def _check_prompts(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   cfg: GenerationConfig, generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != prompt_ids.device.type:
        raise ValueError(f"generator is on {generator.device}, prompts on {prompt_ids.device}: "
                         f"create it with torch.Generator(device=...) on the model's device")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask "
                         f"{tuple(prompt_mask.shape)} must be the same (B, P) shape")
    if not bool(prompt_mask[:, -1].bool().all()):
        raise ValueError("prompts must be left-padded and non-empty (prompt_mask[:, -1] == 1)")
    total = prompt_ids.shape[1] + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt length {prompt_ids.shape[1]} + max_new_tokens "
                         f"{cfg.max_new_tokens} exceeds max_seq_len {model.config.max_seq_len}")


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             cfg: GenerationConfig, generator: torch.Generator | None = None) -> Generation:
    """Continue left-padded prompts (B, P) with up to cfg.max_new_tokens tokens each.

    `model` is a GPT (or anything with its forward(ids, attention_mask, kv_cache=) and
    .config). Each row stops at EOS; the loop stops when all rows have (if stop_early).
    """
    _check_prompts(model, prompt_ids, prompt_mask, cfg, generator)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompt_ids, prompt_mask, cfg, generator)
    finally:
        model.train(was_training)


def _decode(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
            cfg: GenerationConfig, generator: torch.Generator | None) -> Generation:
    B, P = prompt_ids.shape
    dev, N = prompt_ids.device, cfg.max_new_tokens
    cache = KVCache(P + N)
    tokens = torch.full((B, N), cfg.pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, N, dtype=torch.float32, device=dev)
    mask = torch.zeros(B, N, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    logits = model(prompt_ids, attention_mask=prompt_mask, kv_cache=cache)[:, -1]  # (B, V)
    steps = 0
    for t in range(N):
        tok, lp = _next_token(logits, cfg, generator)
        tok = tok.masked_fill(finished, cfg.pad_id)
        tokens[:, t] = tok
        logprobs[:, t] = lp.masked_fill(finished, 0.0)
        mask[:, t] = (~finished).long()
        finished = finished | (tok == cfg.eos_id)
        steps = t + 1
        if t == N - 1 or (cfg.stop_early and bool(finished.all())):
            break
        # Finished rows keep feeding pad (mask 1, so their attention stays well formed);
        # their outputs are discarded.
        step_mask = torch.ones(B, 1, dtype=torch.long, device=dev)
        logits = model(tok[:, None], attention_mask=step_mask, kv_cache=cache)[:, -1]
    return Generation(tokens[:, :steps], logprobs[:, :steps], mask[:, :steps])
