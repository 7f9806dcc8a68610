"""In-process evaluation of policies (pure torch): greedy or sampled responses for text
prompts, reward-model scores of (prompt, response) pairs, and the KL of a policy to a
reference on its own responses. Used by the pipeline's results table and by tests."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trellis.data_pipeline.collate import PromptCollator, ScoreCollator, SFTCollator
from trellis.model.generate import GenerationConfig, generate
from trellis.rl.ppo_math import token_logprobs


def _prompts(tok, prompts: Sequence[str], max_prompt_len: int) -> dict[str, torch.Tensor]:
    return PromptCollator(max_prompt_len)([{"prompt_ids": tok.encode(p)} for p in prompts])


@torch.no_grad()
def respond(policy: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int,
            greedy: bool = True, temperature: float = 1.0, seed: int = 0,
            max_prompt_len: int = 64, batch_size: int = 64) -> list[str]:
    """One response per prompt (text without the EOS)."""
    policy.eval()
    g = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        p = _prompts(tok, prompts[i:i + batch_size], max_prompt_len)
        gen = generate(policy, p["input_ids"], p["attention_mask"],
                       GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy,
                                        temperature=temperature, eos_id=tok.eos_id),
                       generator=None if greedy else g)
        for ids, m in zip(gen.tokens, gen.mask):
            # Ids past the tokenizer (a model vocabulary padded beyond it) decode as unk.
            ids = [t if t < tok.vocab_size else tok.unk_id for t in ids[m.bool()].tolist()
                   if t != tok.eos_id]
            out.append(tok.decode(ids).strip())
    return out


def sample_k(policy: nn.Module, tok, prompts: Sequence[str], k: int, max_new_tokens: int,
             temperature: float = 1.0, seed: int = 0) -> list[list[str]]:
    """k sampled responses per prompt (the comparison candidates a labeler ranks)."""
    flat = [p for p in prompts for _ in range(k)]
    resp = respond(policy, tok, flat, max_new_tokens, greedy=False, temperature=temperature,
                   seed=seed)
    return [resp[i * k:(i + 1) * k] for i in range(len(prompts))]


@torch.no_grad()
def rm_scores(rm: nn.Module, tok, prompts: Sequence[str], responses: Sequence[str],
              max_len: int = 128) -> torch.Tensor:
    """(N,) scores of prompt + response + EOS, encoded as the reward model was trained."""
    rm.eval()
    rows = [{"prompt_ids": tok.encode(p), "response_ids": tok.encode(r)}
            for p, r in zip(prompts, responses)]
    b = ScoreCollator(max_len=max_len, max_prompt_len=max_len // 2)(rows)
    return rm(b["input_ids"], attention_mask=b["attention_mask"]).float()


@torch.no_grad()
def kl_to_reference(policy: nn.Module, reference: nn.Module, tok, prompts: Sequence[str],
                    responses: Sequence[str], max_len: int = 128) -> float:
    """Mean over prompts of sum_t [log pi(a_t) - log ref(a_t)] on the given responses."""
    policy.eval(), reference.eval()
    rows = [{"prompt_ids": tok.encode(p), "response_ids": tok.encode(r)}
            for p, r in zip(prompts, responses)]
    b = SFTCollator(max_len=max_len, max_prompt_len=max_len // 2)(rows)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    resp = labels != -100                                   # (B, T) response tokens (+ EOS)
    tgt = labels.clamp(min=0)
    lp = token_logprobs(policy(ids, attention_mask=mask), tgt)
    lr = token_logprobs(reference(ids, attention_mask=mask), tgt)
    return float(((lp - lr) * resp).sum(1).mean())
