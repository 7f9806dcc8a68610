"""Collators: token blocks / structured rows -> model-ready tensors.

Conventions for every causal collator: ``labels[b, t]`` is the target of position t (already
shifted, so the loss is ``cross_entropy(logits[b, t], labels[b, t])``), IGNORE (-100) where no
loss is taken; ``attention_mask`` is 1 on real tokens, 0 on padding.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from trellis.data_pipeline.tokenizer import EOS_ID, MASK_ID, PAD_ID, SEP_ID
from trellis.parallel.rng import keyed_generator

IGNORE = -100
SPECIAL_IDS = frozenset(range(SEP_ID + 1))


def stack_blocks(batch: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A stacked batch from TokenStream.iter_batches, or a list of TokenStream blocks."""
    if isinstance(batch, dict):
        return batch
    out: dict[str, Any] = {"input_ids": torch.stack([b["input_ids"] for b in batch]),
                           "num_tokens": torch.tensor([int(b["num_tokens"]) for b in batch])}
    return out


def clm_collate(batch: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Causal LM: (B, T+1) blocks -> input_ids/labels/attention_mask (B, T)."""
    b = stack_blocks(batch)
    x, n = b["input_ids"], b["num_tokens"]                 # (B, T+1), (B,)
    t = torch.arange(x.shape[1] - 1)
    labels = x[:, 1:].clone()
    labels[t[None, :] + 1 >= n[:, None]] = IGNORE         # no target past the valid ids
    out = {"input_ids": x[:, :-1], "labels": labels,
           "attention_mask": (t[None, :] < n[:, None]).long()}
    return out


class MLMCollator:
    """RoBERTa-style dynamic masking of (B, T+1) blocks (the last id, the next block's first
    token, is dropped: MLM sees T tokens). Each non-special valid token is chosen with
    probability mask_prob; chosen tokens become [MASK] (80%), a random non-special token
    (10%) or stay (10%); labels hold the original id at chosen positions, IGNORE elsewhere.

    The mask is a pure function of (seed, epoch, consumer, step) carried by stream batches,
    so it is fresh each epoch and step yet identical after a resume. Blocks without that
    metadata use (epoch argument, an internal call counter)."""

    def __init__(self, vocab_size: int, mask_id: int = MASK_ID,
                 special_ids: Iterable[int] = SPECIAL_IDS, mask_prob: float = 0.15,
                 seed: int = 0):
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.vocab_size, self.mask_id, self.mask_prob, self.seed = vocab_size, mask_id, mask_prob, seed
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.random_low = int(self.special.max()) + 1  # random replacements avoid specials
        self._calls = 0

    def state_dict(self) -> dict[str, int]:
        return {"calls": self._calls}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self._calls = int(d.get("calls", 0))

    def __call__(self, batch: dict[str, Any] | Sequence[dict[str, Any]], epoch: int | None = None,
                 step: int | None = None) -> dict[str, torch.Tensor]:
        b = stack_blocks(batch)
        x, n = b["input_ids"][:, :-1], b["num_tokens"]     # (B, T), (B,)
        B, T = x.shape
        ep = b.get("epoch", 0) if epoch is None else epoch
        st = (b["step"] if "step" in b else self._calls) if step is None else step
        self._calls += 1
        g = keyed_generator(self.seed, int(ep), int(b.get("consumer", 0)), int(st))
        valid = torch.arange(T)[None, :] < n[:, None]
        candidate = valid & ~torch.isin(x, self.special)
        chosen = (torch.rand((B, T), generator=g) < self.mask_prob) & candidate
        action = torch.rand((B, T), generator=g)
        rand_tok = torch.randint(self.random_low, self.vocab_size, (B, T), generator=g)
        inputs = x.clone()
        inputs[chosen & (action < 0.8)] = self.mask_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = rand_tok[swap].to(inputs.dtype)  # stream ids are int32
        labels = torch.where(chosen, x, torch.full_like(x, IGNORE))
        return {"input_ids": inputs, "labels": labels, "attention_mask": valid.long()}


# -- structured rows -------------------------------------------------------------------------
def _pad_right(seqs: Sequence[Sequence[int]], pad: int, width: int | None = None) -> torch.Tensor:
    width = width or max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def _fit(prompt: Sequence[int], response: Sequence[int], max_len: int,
         max_prompt_len: int) -> tuple[list[int], list[int]]:
    """Keep the prompt's end (at most max_prompt_len) and the response's start; the response
    ends with EOS unless it had to be cut."""
    prompt = list(prompt)[-max_prompt_len:] if max_prompt_len > 0 else []
    response = list(response) + [EOS_ID]
    return prompt, response[:max(0, max_len + 1 - len(prompt))]


class SFTCollator:
    """Demonstrations {prompt_ids, response_ids} -> causal batch with loss only on response
    tokens (and the EOS that ends them); prompt and padding labels are IGNORE."""

    def __init__(self, max_len: int = 512, max_prompt_len: int | None = None, pad_id: int = PAD_ID):
        self.max_len, self.pad_id = max_len, pad_id
        self.max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, starts = [], []
        for r in rows:
            p, resp = _fit(r["prompt_ids"], r["response_ids"], self.max_len, self.max_prompt_len)
            seqs.append(p + resp)
            starts.append(len(p))
        full = _pad_right(seqs, self.pad_id)                    # (B, L+1)
        lens = torch.tensor([len(s) for s in seqs])
        t = torch.arange(full.shape[1] - 1)[None, :]
        labels = full[:, 1:].clone()                            # target of position t is t+1
        is_response = (t + 1 >= torch.tensor(starts)[:, None]) & (t + 1 < lens[:, None])
        labels[~is_response] = IGNORE
        return {"input_ids": full[:, :-1], "labels": labels,
                "attention_mask": (t < lens[:, None]).long()}


class ScoreCollator:
    """{prompt_ids, response_ids} -> what a reward model scores: prompt + response + EOS,
    right-padded, nothing dropped (SFTCollator's input_ids lose the last column, its
    target), so the score is read at each row's EOS exactly as in training (PairCollator).
    Returns input_ids/attention_mask (N, L) and last_index (N,)."""

    def __init__(self, max_len: int = 512, max_prompt_len: int | None = None, pad_id: int = PAD_ID):
        self.max_len, self.pad_id = max_len, pad_id
        self.max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = []
        for r in rows:
            p, resp = _fit(r["prompt_ids"], r["response_ids"], self.max_len - 1,
                           self.max_prompt_len)
            seqs.append(p + resp)
        ids = _pad_right(seqs, self.pad_id)
        lens = torch.tensor([len(s) for s in seqs])
        return {"input_ids": ids,
                "attention_mask": (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long(),
                "last_index": lens - 1}


def ranking_pairs(ranking: Sequence[float]) -> list[tuple[int, int]]:
    """Every ordered pair (better, worse) of a ranking where ranking[i] is response i's rank
    (smaller is better); equal ranks are ties and make no pair."""
    return [(i, j) for i in range(len(ranking)) for j in range(len(ranking))
            if ranking[i] < ranking[j]]


class PairCollator:
    """Comparisons {prompt_ids, responses_ids: [K lists], ranking: [K]} -> every response of
    the batch once (prompt + response + EOS, right-padded) and all strict-preference pairs
    kept together per prompt (InstructGPT: a prompt's C(K,2) comparisons form one batch
    element; pair_weight = 1 / pairs of its prompt, so each prompt counts once).

    Returns input_ids/attention_mask (N, L), last_index (N,) (score position), and per pair
    chosen_index/rejected_index (rows of input_ids), pair_prompt, pair_weight (P,)."""

    def __init__(self, max_len: int = 512, max_prompt_len: int | None = None, pad_id: int = PAD_ID):
        self.max_len, self.pad_id = max_len, pad_id
        self.max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        flat, chosen, rejected, prompt_of, weight = [], [], [], [], []
        for pi, r in enumerate(rows):
            base = len(flat)
            flat += [{"prompt_ids": r["prompt_ids"], "response_ids": resp}
                     for resp in r["responses_ids"]]
            pairs = ranking_pairs(r["ranking"])
            for i, j in pairs:
                chosen.append(base + i), rejected.append(base + j)
                prompt_of.append(pi), weight.append(1.0 / len(pairs))
        out = ScoreCollator(self.max_len, self.max_prompt_len, self.pad_id)(flat)
        return out | {"chosen_index": torch.tensor(chosen, dtype=torch.long),
                      "rejected_index": torch.tensor(rejected, dtype=torch.long),
                      "pair_prompt": torch.tensor(prompt_of, dtype=torch.long),
                      "pair_weight": torch.tensor(weight, dtype=torch.float32)}


class PromptCollator:
    """Prompts {prompt_ids} -> left-padded input_ids/attention_mask (B, L) for generation,
    with position_ids counting real tokens only (0 on padding)."""

    def __init__(self, max_prompt_len: int = 256, pad_id: int = PAD_ID):
        self.max_prompt_len, self.pad_id = max_prompt_len, pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [list(r["prompt_ids"])[-self.max_prompt_len:] for r in rows]
        width = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
        lens = torch.tensor([len(s) for s in seqs])
        mask = (torch.arange(width)[None, :] >= (width - lens)[:, None]).long()
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
