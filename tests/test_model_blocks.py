"""GPT and BERT forward behaviour: masks, positions, KV cache, init, checkpointing."""
import math

import pytest
import torch
import torch.nn.functional as F

from trellis.model import GPT, BertForMaskedLM, KVCache, ModelConfig, set_activation_checkpointing


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(arch="gpt", vocab_size=64, n_layer=2, n_head=2, d_model=32,
                           max_seq_len=32, **kw))


def test_left_padding_equals_unpadded_and_pad_rows_are_finite():
    model = _gpt().eval()
    seq = torch.randint(1, 64, (1, 6))
    ids = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = seq, 1  # left padded
    ids[1, :6], mask[1, :6] = seq, 1  # right padded
    # row 2: all padding
    with torch.no_grad():
        ref = model(seq)[0]
        out = model(ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 4:], ref, atol=1e-5)
    assert torch.allclose(out[1, :6], ref, atol=1e-5)


def test_causality():
    model = _gpt().eval()
    ids = torch.randint(0, 64, (2, 12))
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_kv_cache_chunks_equal_full_forward():
    model = _gpt().eval()
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    cache = KVCache(16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        parts = [model(ids[:, :5], attention_mask=mask[:, :5], kv_cache=cache),
                 model(ids[:, 5:6], attention_mask=mask[:, 5:6], kv_cache=cache),
                 model(ids[:, 6:], attention_mask=mask[:, 6:], kv_cache=cache)]
    got = torch.cat(parts, 1)
    m = mask.bool()
    assert torch.allclose(got[m], full[m], atol=1e-5)
    assert cache.length == 12 and cache.seen.tolist() == [12, 9]
    with pytest.raises(ValueError, match="KVCache full"):
        model(ids[:, :5], kv_cache=cache)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="max_seq_len 32"):
        _gpt()(torch.zeros(1, 33, dtype=torch.long))


def test_gpt_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="gpt", vocab_size=64, n_layer=8, n_head=4, d_model=256))
    want = 0.02 / math.sqrt(2 * 8)
    assert abs(model.h[3].attn.c_proj.weight.std().item() / want - 1) < 0.03
    assert abs(model.h[3].mlp.c_proj.weight.std().item() / want - 1) < 0.03
    assert abs(model.h[3].attn.c_attn.weight.std().item() / 0.02 - 1) < 0.03
    assert model.h[0].attn.c_attn.bias.abs().max() == 0
    assert model.lm_head.weight is model.wte.weight
    assert model.h[0] is not model.h[1] and model.h[0].ln_1 is not model.h[1].ln_1


def _saved_tensor_count(fn) -> int:
    n = 0

    def pack(t):
        nonlocal n
        n += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return n


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_activation_checkpointing_same_loss_and_grads(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=64, n_layer=3, n_head=2, d_model=32,
                      max_seq_len=32, dropout=0.1)
    model = GPT(cfg) if arch == "gpt" else BertForMaskedLM(cfg)
    model.train()
    ids = torch.randint(1, 64, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, :5] = 0

    def step():
        model.zero_grad()
        torch.manual_seed(123)  # same dropout masks in both runs
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[mask.bool()], ids[mask.bool()])
        loss.backward()
        # (BERT's pooler is unused by the MLM loss and has no grad.)
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    loss_off, grads_off = step()
    saved_off = _saved_tensor_count(lambda: model(ids, attention_mask=mask).sum())
    set_activation_checkpointing(model, True)
    loss_on, grads_on = step()
    saved_on = _saved_tensor_count(lambda: model(ids, attention_mask=mask).sum())
    assert saved_on < saved_off / 2  # blocks really were checkpointed
    assert torch.allclose(loss_on, loss_off, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_off) > 20
    for n, g in grads_off.items():
        assert torch.allclose(grads_on[n], g, atol=1e-6), n
    set_activation_checkpointing(model, False)
    assert _saved_tensor_count(lambda: model(ids, attention_mask=mask).sum()) == saved_off


def test_set_activation_checkpointing_needs_a_trunk():
    with pytest.raises(ValueError, match="Linear contains no GPT/Bert trunk"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), True)


def test_bert_padding_keeps_real_positions():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="bert", vocab_size=64, n_layer=2, n_head=2, d_model=32,
                      max_seq_len=32)
    model = BertForMaskedLM(cfg).eval()
    seq = torch.randint(1, 64, (1, 7))
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0, :7] = seq
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :7] = 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        ref = model(seq)
    assert torch.isfinite(out).all()  # row 1 is all padding
    assert torch.allclose(out[0, :7], ref[0], atol=1e-5)


def test_saved_config_with_retired_activation_checkpointing_key_loads(tmp_path):
    """model.json written before activation checkpointing moved to parallel/ still loads
    (the retired key is dropped); any other unknown key is still an error."""
    import json

    from trellis.model.io import META, load_module, save_module

    model = _gpt()
    save_module(model, model.config, "lm", tmp_path)
    meta = json.loads((tmp_path / META).read_text())
    assert "activation_checkpointing" not in meta["model"]
    meta["model"]["activation_checkpointing"] = True  # as older versions wrote it
    (tmp_path / META).write_text(json.dumps(meta))
    loaded, cfg, _ = load_module(tmp_path)
    assert cfg == model.config and loaded.activation_checkpointing is False
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))
    with pytest.raises(TypeError, match="nope"):
        ModelConfig.from_saved({**meta["model"], "nope": 1})
