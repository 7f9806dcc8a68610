"""Hugging Face parity: random transformers GPT-2 / BERT load into trellis with the same
logits, and trellis exports load back into transformers with the same logits.

Measured max |diff| values are collected in PARITY and printed (run with -s to see them).
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM as HFBertMLM, BertModel as HFBertModel,
                          GPT2Config, GPT2LMHeadModel)

from trellis.model import GPT, BertForMaskedLM, ModelConfig
from trellis.model.hf_names import name_table
from trellis.model.hf import (config_from_hf, from_hf_state_dict, hf_config, load_hf_pretrained,
                      save_hf_pretrained, to_hf_state_dict)

TOL = 1e-5
PARITY: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nHF parity max |diff| (fp32, eval):")
    for k, v in PARITY.items():
        print(f"  {k}: {v:.3g}")


def _record(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a - b).abs().max().item()
    PARITY[name] = d
    return d


def _scramble(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorm weights and biases too), so a swapped or
    misnamed parameter cannot hide behind default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "LayerNorm.weight" in name or "ln" in name and
                    name.endswith("weight") and p.dim() == 1 else noise * 2)


def _hf_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    c = GPT2Config(vocab_size=97, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                   bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    m = GPT2LMHeadModel(c)
    _scramble(m, 1)
    return m.eval()


def _hf_bert(cls=HFBertMLM):
    torch.manual_seed(0)
    c = BertConfig(vocab_size=91, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=80, max_position_embeddings=40, type_vocab_size=2,
                   attn_implementation="eager")
    m = cls(c)
    _scramble(m, 2)
    return m.eval()


def _ids(vocab: int, B: int = 3, T: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(3))


def _left_pad_mask(B: int, T: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return mask


def test_hf_gpt2_loads_with_same_logits(tmp_path):
    hf = _hf_gpt2()
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_pretrained(tmp_path)
    assert isinstance(model, GPT) and cfg.arch == "gpt" and cfg.d_model == 48
    assert model.lm_head.weight is model.wte.weight
    ids = _ids(97)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert _record("hf gpt2 -> trellis", out, ref) <= TOL
    # Left padding: explicit positions to both; compare real positions only.
    mask = _left_pad_mask(3, 17, [17, 9, 1])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = model(ids, attention_mask=mask, position_ids=pos)
        implicit = model(ids, attention_mask=mask)  # positions derived from the mask
    m = mask.bool()
    assert torch.isfinite(out).all()
    assert _record("hf gpt2 -> trellis, left-padded", out[m], ref[m]) <= TOL
    assert torch.equal(implicit, out)


def test_hf_bert_mlm_loads_with_same_logits(tmp_path):
    hf = _hf_bert()
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_pretrained(tmp_path)
    assert isinstance(model, BertForMaskedLM) and cfg.layer_norm_eps == 1e-12
    assert cfg.d_ff == 80
    ids = _ids(91)
    types = (torch.arange(17) >= 8).long().expand(3, 17)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 10:] = 0  # right padding
    mask[2, 3:] = 0
    with torch.no_grad():
        ref = hf(ids, token_type_ids=types).logits
        out = model(ids, token_type_ids=types)
        ref_p = hf(ids, attention_mask=mask, token_type_ids=types).logits
        out_p = model(ids, attention_mask=mask, token_type_ids=types)
    assert _record("hf bert-mlm -> trellis", out, ref) <= TOL
    m = mask.bool()
    assert _record("hf bert-mlm -> trellis, padded", out_p[m], ref_p[m]) <= TOL


def test_hf_bert_base_model_loads_trunk(tmp_path):
    """A BertModel checkpoint (no "bert." prefix, no MLM head) fills the trunk and pooler."""
    hf = _hf_bert(HFBertModel)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_pretrained(tmp_path)
    ids = _ids(91)
    with torch.no_grad():
        ref = hf(ids)
        hidden = model.hidden_states(ids)
        pooled = model.bert.pooled(ids)
    assert _record("hf bert-base hidden -> trellis", hidden, ref.last_hidden_state) <= TOL
    assert _record("hf bert-base pooled -> trellis", pooled, ref.pooler_output) <= TOL


def _trellis_gpt() -> tuple[GPT, ModelConfig]:
    torch.manual_seed(4)
    cfg = ModelConfig(arch="gpt", vocab_size=83, n_layer=2, n_head=4, d_model=32, d_ff=72,
                      max_seq_len=24, dropout=0.1)
    m = GPT(cfg)
    _scramble(m, 5)
    return m.eval(), cfg


def test_trellis_gpt_export_loads_in_transformers(tmp_path):
    model, cfg = _trellis_gpt()
    tok = tmp_path / "sp.model"
    tok.write_bytes(b"not really a sentencepiece model")
    out = save_hf_pretrained(model, cfg, tmp_path / "export", tokenizer_file=str(tok))
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.n_inner == 72
    ids = _ids(83, T=20)
    mask = _left_pad_mask(3, 20, [20, 5, 12])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        d1 = _record("trellis gpt -> hf", hf(ids).logits, model(ids))
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask)
    m = mask.bool()
    d2 = _record("trellis gpt -> hf, left-padded", ref[m], got[m])
    assert d1 <= TOL and d2 <= TOL
    # Round trip back into trellis is exact.
    again, cfg2 = load_hf_pretrained(out)
    assert cfg2.d_ff == 72 and cfg2.max_seq_len == 24
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_bias_free_gpt_exports_as_gpt2_with_zero_biases(tmp_path):
    """model.bias=False: no bias in any linear layer or LayerNorm; the export is GPT-2 with
    zero biases, the same logits."""
    _, cfg = _trellis_gpt()
    cfg = ModelConfig(**{**cfg.__dict__, "bias": False})
    torch.manual_seed(4)
    model = GPT(cfg)
    _scramble(model, 5)
    model.eval()
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    # every GPT-2 weight is written (transformers would otherwise init the missing ones)
    assert set(to_hf_state_dict(model.state_dict(), cfg)) == {t for _, t, _ in name_table(cfg)}
    hf = GPT2LMHeadModel.from_pretrained(save_hf_pretrained(model, cfg, tmp_path / "export"),
                                         attn_implementation="eager").eval()
    assert all(float(p.abs().max()) == 0 for n, p in hf.named_parameters() if n.endswith(".bias"))
    ids = _ids(83, T=20)
    with torch.no_grad():
        assert _record("trellis gpt bias=False -> hf", hf(ids).logits, model(ids)) <= TOL


def test_exact_gelu_gpt_exports_as_gpt2_with_gelu_and_round_trips(tmp_path):
    """model.activation=gelu (nanoGPT's exact GELU): the export names HF's 'gelu', the logits
    match, it reads back as the same config, and it is a different function from the tanh
    form (the switch is live)."""
    _, cfg = _trellis_gpt()
    cfg = ModelConfig(**{**cfg.__dict__, "activation": "gelu"})
    torch.manual_seed(4)
    model = GPT(cfg)
    _scramble(model, 5)
    model.eval()
    out = save_hf_pretrained(model, cfg, tmp_path / "export")
    hf = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.activation_function == "gelu"
    ids = _ids(83, T=20)
    tanh = GPT(ModelConfig(**{**cfg.__dict__, "activation": "gelu_tanh"}))
    tanh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert _record("trellis gpt gelu -> hf", hf(ids).logits, model(ids)) <= TOL
        assert (tanh.eval()(ids) - model(ids)).abs().max() > 10 * TOL
    assert load_hf_pretrained(out)[1].activation == "gelu"


def test_trellis_bert_export_loads_in_transformers(tmp_path):
    torch.manual_seed(6)
    cfg = ModelConfig(arch="bert", vocab_size=79, n_layer=2, n_head=2, d_model=32,
                      max_seq_len=24, layer_norm_eps=1e-12, type_vocab_size=3)
    model = BertForMaskedLM(cfg)
    _scramble(model, 7)
    model.eval()
    out = save_hf_pretrained(model, cfg, tmp_path)
    hf = HFBertMLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids(79, T=20)
    types = torch.randint(0, 3, (3, 20), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 15:] = 0
    with torch.no_grad():
        d1 = _record("trellis bert-mlm -> hf", hf(ids, token_type_ids=types).logits,
                     model(ids, token_type_ids=types))
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        got = model(ids, attention_mask=mask, token_type_ids=types)
    m = mask.bool()
    d2 = _record("trellis bert-mlm -> hf, padded", ref[m], got[m])
    assert d1 <= TOL and d2 <= TOL


def test_state_dict_mapping_writes_tied_weights_once():
    model, cfg = _trellis_gpt()
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    assert "lm_head.weight" not in hf_sd and "transformer.wte.weight" in hf_sd
    # Conv1D layout: (in, out).
    assert hf_sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 72)
    back = from_hf_state_dict(hf_sd, cfg)
    assert back.keys() == model.state_dict().keys()
    assert back["lm_head.weight"] is back["wte.weight"]
    bcfg = ModelConfig(arch="bert", vocab_size=50, n_layer=1, n_head=2, d_model=16)
    bsd = to_hf_state_dict(BertForMaskedLM(bcfg).state_dict(), bcfg)
    assert "cls.predictions.decoder.weight" not in bsd and "cls.predictions.bias" in bsd


def test_hf_config_round_trip():
    for cfg in (ModelConfig.from_preset("gpt2"), ModelConfig.from_preset("bert-base")):
        back = config_from_hf(hf_config(cfg))
        for f in ("arch", "vocab_size", "n_layer", "n_head", "d_model", "max_seq_len",
                  "layer_norm_eps", "dropout", "pad_id"):
            assert getattr(back, f) == getattr(cfg, f), f
    assert hf_config(ModelConfig.from_preset("gpt2"))["n_inner"] is None


def test_bad_inputs_are_named(tmp_path):
    cfg = ModelConfig(arch="gpt", vocab_size=50, n_layer=1, n_head=2, d_model=16)
    sd = to_hf_state_dict(GPT(cfg).state_dict(), cfg)
    sd["transformer.h.0.attn.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="transformer.h.0.attn.rotary.weight"):
        from_hf_state_dict(sd, cfg)
    with pytest.raises(ValueError, match="no HF name for 'extra.weight'"):
        to_hf_state_dict({"extra.weight": torch.zeros(1)}, cfg)
    bad = hf_config(cfg)
    bad["activation_function"] = "relu"
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf(bad)
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_pretrained(tmp_path)
    # A checkpoint missing a layer is refused, naming the weight.
    model = GPT(cfg)
    save_hf_pretrained(model, cfg, tmp_path)
    from safetensors.torch import load_file, save_file
    w = load_file(str(tmp_path / "model.safetensors"))
    del w["transformer.h.0.ln_2.bias"]
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="h.0.ln_2.bias"):
        load_hf_pretrained(tmp_path)
