"""Scalar heads on a trunk for RLHF: a per-token value model (PPO critic) and a
per-sequence score model (reward model).

`trunk` is any module with `hidden_states(input_ids, attention_mask) -> (B, T, C)` and a
`.config` (ModelConfig): GPT, Bert, BertForMaskedLM.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trellis.model.layers import Linear


def last_token_index(attention_mask: torch.Tensor | None, batch: int, length: int,
                     device: torch.device) -> torch.Tensor:
    """(B,) index of the last real token of each row; works for left and right padding."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    m = attention_mask.bool()
    pos = torch.arange(length, device=device)[None].expand(batch, length)  # (B, T)
    # The largest position holding a token; a row with none gets 0.
    return torch.where(m, pos, torch.zeros_like(pos)).amax(dim=1)


def _head(trunk: nn.Module) -> Linear:
    d = trunk.config.d_model
    return Linear(d, 1, std=1.0 / math.sqrt(d + 1))


def load_trunk_state_dict(trunk: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load pretrained weights into `trunk`, accepting a checkpoint of a larger model that
    contains it: a BertForMaskedLM state dict into a Bert trunk ("bert." prefix, MLM head
    dropped). Raises on any missing trunk key."""
    own = trunk.state_dict().keys()
    if not any(k in state_dict for k in own):
        for prefix in ("bert.", "trunk."):
            stripped = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if any(k in stripped for k in own):
                state_dict = stripped
                break
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise KeyError(f"trunk weights missing '{missing[0]}' ({len(missing)} keys missing)")
    trunk.load_state_dict({k: state_dict[k] for k in own})


class ValueModel(nn.Module):
    """Per-token values: linear(hidden) -> (B, T)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.value_head = _head(trunk)

    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk.hidden_states(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk.hidden_states(input_ids, attention_mask)  # (B, T, C)
        return self.value_head(h).squeeze(-1)  # (B, T)


class ScoreModel(nn.Module):
    """Sequence score from the last real token: (linear(hidden) - mean) / std -> (B,).

    The head's bias is the learned output bias; `norm_mean`/`norm_std` are buffers (saved
    with the model) set after training so demonstrations score 0 on average with unit
    spread (InstructGPT normalises its reward model this way).
    """

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.score_head = _head(trunk)
        self.register_buffer("norm_mean", torch.zeros(()))
        self.register_buffer("norm_std", torch.ones(()))

    def set_normalization(self, mean: float, std: float = 1.0) -> None:
        if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
            raise ValueError(f"set_normalization needs finite mean and std > 0, got "
                             f"mean={mean}, std={std}")
        self.norm_mean.fill_(float(mean))
        self.norm_std.fill_(float(std))

    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk.hidden_states(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None,
                score_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) scores of padded rows; or, for packed rows (segment_ids (B, T), a GPT
        trunk), (N,) scores read at score_index (N,): flat indices b * T + t of each
        sequence's last token."""
        B, T = input_ids.shape
        if segment_ids is not None:
            h = self.trunk.hidden_states(input_ids, attention_mask, segment_ids=segment_ids)
            return self._score(h.flatten(0, 1)[score_index])  # (N,)
        h = self.trunk.hidden_states(input_ids, attention_mask)  # (B, T, C)
        idx = last_token_index(attention_mask, B, T, input_ids.device)  # (B,)
        last = h[torch.arange(B, device=h.device), idx]  # (B, C)
        return self._score(last)

    def _score(self, last: torch.Tensor) -> torch.Tensor:
        """(N, C) hidden states at the scored tokens -> (N,) normalised scores."""
        raw = self.score_head(last).squeeze(-1)  # (N,)
        return (raw - self.norm_mean) / self.norm_std


class ScoreEnsemble(nn.Module):
    """k reward models scoring the same rows -> (B, k) (Coste et al. 2023: optimise a
    conservative combination of the members, not one model's errors)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("ScoreEnsemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([m(input_ids, attention_mask) for m in self.members], dim=1)
