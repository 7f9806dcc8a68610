"""Size presets for ModelConfig. A preset fills defaults; keys set next to it win.

Published sizes: GPT-2 (Radford et al. 2019, the released 124M/355M/774M/1.5B checkpoints)
and BERT (Devlin et al. 2018, base/large). Tiny presets are for CPU tests and smoke runs.
"""
from __future__ import annotations

_GPT2 = {"arch": "gpt", "vocab_size": 50257, "max_seq_len": 1024, "dropout": 0.1,
         "layer_norm_eps": 1e-5}
_BERT = {"arch": "bert", "vocab_size": 30522, "max_seq_len": 512, "dropout": 0.1,
         "layer_norm_eps": 1e-12, "type_vocab_size": 2, "pad_id": 0}

PRESETS: dict[str, dict] = {
    "gpt2": {**_GPT2, "n_layer": 12, "n_head": 12, "d_model": 768},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "d_model": 1024},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_head": 20, "d_model": 1280},
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_head": 25, "d_model": 1600},
    "bert-base": {**_BERT, "n_layer": 12, "n_head": 12, "d_model": 768},
    "bert-large": {**_BERT, "n_layer": 24, "n_head": 16, "d_model": 1024},
    "gpt-tiny": {"arch": "gpt", "n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 128},
    "gpt-small-cpu": {"arch": "gpt", "n_layer": 4, "n_head": 4, "d_model": 128,
                      "max_seq_len": 256},
    "bert-tiny": {"arch": "bert", "n_layer": 2, "n_head": 2, "d_model": 64,
                  "layer_norm_eps": 1e-12},
}
