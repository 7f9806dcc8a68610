"""Value and score heads on GPT and BERT trunks."""
import pytest
import torch

from trellis.model import BertForMaskedLM, ModelConfig, build_model
from trellis.model.heads import last_token_index, load_trunk_state_dict


def _pad(seq: torch.Tensor, T: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(seq)
    ids = torch.zeros(T, dtype=torch.long)
    mask = torch.zeros(T, dtype=torch.long)
    sl = slice(T - n, T) if left else slice(0, n)
    ids[sl], mask[sl] = seq, 1
    return ids, mask


def test_last_token_index_left_and_right():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask, 4, 4, mask.device).tolist() == [3, 2, 0, 3]
    assert last_token_index(None, 2, 5, mask.device).tolist() == [4, 4]


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_score_model_reads_the_last_real_token(arch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(f"{arch}-tiny", vocab_size=50)
    model = build_model(cfg, "score").eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 50, (5,), generator=g), torch.randint(1, 50, (8,), generator=g)
    with torch.no_grad():
        alone = torch.stack([model(a[None])[0], model(b[None])[0]])  # (2,)
        for left in ([True, True], [False, False], [True, False]):
            rows = [_pad(a, 10, left[0]), _pad(b, 10, left[1])]
            ids = torch.stack([r[0] for r in rows])
            mask = torch.stack([r[1] for r in rows])
            scores = model(ids, attention_mask=mask)
            assert scores.shape == (2,)
            if arch == "gpt" or not any(left):  # BERT positions count from column 0
                assert torch.allclose(scores, alone, atol=1e-5), left
        # Reading the last column instead would give a different value under right padding.
        ids, mask = _pad(a, 10, left=False)
        wrong = model(ids[None])[0]
        assert not torch.allclose(wrong, alone[0], atol=1e-3)


def test_score_normalization_is_saved():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("gpt-tiny", vocab_size=50), "score").eval()
    ids = torch.randint(1, 50, (3, 6))
    with torch.no_grad():
        raw = model(ids)
        model.set_normalization(mean=0.5, std=2.0)
        assert torch.allclose(model(ids), (raw - 0.5) / 2.0)
    sd = model.state_dict()
    assert sd["norm_mean"].item() == 0.5 and sd["norm_std"].item() == 2.0
    assert "score_head.bias" in sd
    with pytest.raises(ValueError, match="std > 0"):
        model.set_normalization(0.0, 0.0)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_value_model_shape_and_grad(arch):
    cfg = ModelConfig.from_preset(f"{arch}-tiny", vocab_size=50)
    model = build_model(cfg, "value")
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0
    values = model(ids, attention_mask=mask)
    assert values.shape == (3, 7) and torch.isfinite(values).all()
    values[mask.bool()].sum().backward()
    assert model.value_head.weight.grad.abs().sum() > 0
    first_layer = model.trunk.h[0] if arch == "gpt" else model.trunk.layers[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_layer.parameters())


def test_load_trunk_from_mlm_checkpoint():
    cfg = ModelConfig.from_preset("bert-tiny", vocab_size=50)
    mlm = BertForMaskedLM(cfg)
    score = build_model(cfg, "score")
    load_trunk_state_dict(score.trunk, mlm.state_dict())
    assert torch.equal(score.trunk.tok_emb.weight, mlm.bert.tok_emb.weight)
    with pytest.raises(KeyError, match="missing"):
        load_trunk_state_dict(score.trunk, {"bert.tok_emb.weight": mlm.bert.tok_emb.weight})
