"""trellis model: pure-torch GPT, BERT and encoder-decoder, heads, KV-cache generation and
beam search, HF interchange.

Imports nothing distributed (no ray, no deepspeed).
"""
from trellis.model.bert import Bert, BertForMaskedLM, BertForSequenceClassification
from trellis.model.build import build_model, set_activation_checkpointing
from trellis.model.config import ModelConfig
from trellis.model.generate import Generation, GenerationConfig, generate
from trellis.model.gpt import GPT
from trellis.model.heads import ScoreModel, ValueModel
from trellis.model.kv_cache import KVCache
from trellis.model.seq2seq import Seq2Seq, Seq2SeqCache
from trellis.model.seq2seq_generate import TranslateConfig, beam_search, greedy_search, translate

__all__ = ["ModelConfig", "GPT", "Bert", "BertForMaskedLM", "BertForSequenceClassification",
           "build_model", "set_activation_checkpointing", "generate", "GenerationConfig",
           "Generation", "KVCache", "ScoreModel", "ValueModel", "Seq2Seq", "Seq2SeqCache",
           "TranslateConfig", "translate", "greedy_search", "beam_search"]
