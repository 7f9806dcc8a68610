"""trellis model: pure-torch GPT and BERT, heads, KV-cache generation, HF interchange.

Imports nothing distributed (no ray, no deepspeed).
"""
from model.bert import Bert, BertForMaskedLM, BertForSequenceClassification
from model.build import build_model, set_activation_checkpointing
from model.config import ModelConfig
from model.generate import Generation, GenerationConfig, generate
from model.gpt import GPT
from model.heads import ScoreModel, ValueModel
from model.kv_cache import KVCache

__all__ = ["ModelConfig", "GPT", "Bert", "BertForMaskedLM", "BertForSequenceClassification",
           "build_model", "set_activation_checkpointing", "generate", "GenerationConfig",
           "Generation", "KVCache", "ScoreModel", "ValueModel"]
