"""ModelConfig, presets, build_model, parameter and FLOP counts."""
import pytest
import torch

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.model import (GPT, Bert, BertForMaskedLM, BertForSequenceClassification, ModelConfig,
                   ScoreModel, ValueModel, build_model)
from trellis.model.flops import count_params, flops_per_token
from trellis.model.presets import PRESETS


def test_gpt2_preset_has_124m_params():
    cfg = ModelConfig.from_preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.vocab_size, cfg.max_seq_len) == (
        12, 12, 768, 50257, 1024)
    assert count_params(cfg) == 124_439_808  # tied embeddings counted once
    assert count_params(cfg, exclude_embeddings=True) == 85_056_000  # Kaplan's 85M
    # 6 * (85,056,000 + 50257 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, 1024) == 6 * 123_653_376 + 113_246_208


def test_published_sizes():
    sizes = {"gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
             "gpt2-xl": 1_557_611_200,
             # BERT-base MLM (HF BertForMaskedLM 109,514,298) + its pooler (590,592)
             "bert-base": 110_104_890}
    for name, n in sizes.items():
        assert count_params(ModelConfig.from_preset(name)) == n, name


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("d_ff", [0, 72])
def test_count_params_config_matches_module(arch, d_ff):
    cfg = ModelConfig.from_preset(f"{arch}-tiny", vocab_size=300, d_ff=d_ff, type_vocab_size=3)
    model = build_model(cfg, "lm" if arch == "gpt" else "mlm")
    assert count_params(model) == count_params(cfg) == sum(
        p.numel() for p in model.parameters())
    tables = 300 * 64 + cfg.max_seq_len * 64 + (3 * 64 if arch == "bert" else 0)
    assert count_params(model, exclude_embeddings=True) == count_params(cfg) - tables
    assert count_params(cfg, exclude_embeddings=True) == count_params(cfg) - tables


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert cfg.preset == name and cfg.arch in ("gpt", "bert")
    assert ModelConfig.from_preset("bert-base").layer_norm_eps == 1e-12
    assert ModelConfig.from_preset("gpt2").dropout == 0.1


def test_unknown_preset_and_bad_heads_are_refused():
    with pytest.raises(KeyError, match="unknown preset 'gpt5' \\(allowed: gpt2, "):
        ModelConfig.preset_values("gpt5")
    with pytest.raises(ValueError, match="n_head=5"):
        ModelConfig(d_model=64, n_head=5)


def test_config_loader_applies_presets(tmp_path):
    cfg = load_config(ModelConfig, None, ["preset=gpt-tiny", "n_layer=3"])
    assert (cfg.n_layer, cfg.d_model, cfg.max_seq_len, cfg.arch) == (3, 64, 128, "gpt")
    with pytest.raises(ConfigError, match="preset"):
        load_config(ModelConfig, None, ["preset=nope"])
    with pytest.raises(ConfigError, match="dropout"):
        load_config(ModelConfig, None, ["dropout=1.5"])
    with pytest.raises(ConfigError, match="n_head"):
        load_config(ModelConfig, None, ["d_model=100", "n_head=3"])
    with pytest.raises(ConfigError, match="arch"):
        load_config(ModelConfig, None, ["arch=t5"])


def test_build_model_heads():
    gcfg = ModelConfig.from_preset("gpt-tiny", vocab_size=100)
    bcfg = ModelConfig.from_preset("bert-tiny", vocab_size=100, num_labels=3)
    ids = torch.randint(0, 100, (2, 9))
    assert type(build_model(gcfg)) is GPT
    assert build_model(gcfg)(ids).shape == (2, 9, 100)
    assert type(build_model(bcfg, "mlm")) is BertForMaskedLM
    assert build_model(bcfg, "mlm")(ids).shape == (2, 9, 100)
    cls = build_model(bcfg, "cls")
    assert isinstance(cls, BertForSequenceClassification) and cls(ids).shape == (2, 3)
    for cfg, trunk in ((gcfg, GPT), (bcfg, Bert)):
        v, s = build_model(cfg, "value"), build_model(cfg, "score")
        assert isinstance(v, ValueModel) and isinstance(v.trunk, trunk)
        assert isinstance(s, ScoreModel) and isinstance(s.trunk, trunk)
    with pytest.raises(ValueError, match="head 'mlm' needs arch 'bert'"):
        build_model(gcfg, "mlm")
    with pytest.raises(ValueError, match="head 'lm' needs arch 'gpt'"):
        build_model(bcfg, "lm")
