"""Model factories for `module:function` recipes in tests: tiny random models, no downloads."""

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from inferforge.models import demo_model_dir


def tiny_bert():
    """A 2-layer, 64-wide BERT with seeded random weights and the demo model's tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    return BertModel(config).eval(), AutoTokenizer.from_pretrained(demo_model_dir())


def not_a_pair():
    return "oops"


def demo_tokenizer_counter():
    """Token count (with special tokens) of a text under the demo model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    return lambda text: len(tokenizer(text)["input_ids"])
