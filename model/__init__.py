"""trellis model: pure-torch GPT and BERT, heads, KV-cache generation, HF interchange.

Imports nothing distributed (no ray, no deepspeed).
"""
from trellis.model.bert import Bert, BertForMaskedLM, BertForSequenceClassification
from trellis.model.build import build_model, set_activation_checkpointing
from trellis.model.config import ModelConfig
from trellis.model.generate import Generation, GenerationConfig, generate
from trellis.model.gpt import GPT
from trellis.model.heads import ScoreModel, ValueModel
from trellis.model.kv_cache import KVCache

__all__ = ["ModelConfig", "GPT", "Bert", "BertForMaskedLM", "BertForSequenceClassification",
           "build_model", "set_activation_checkpointing", "generate", "GenerationConfig",
           "Generation", "KVCache", "ScoreModel", "ValueModel"]
