"""Tiny teachers and text for the distillation tests (seeded, no downloads)."""

from pathlib import Path

import torch

DOCS = Path(__file__).parent / "data" / "python_docs.txt"


def save_tiny_bert(path: Path, *, layers: int = 3, vocab_size: int | None = None, seed: int = 0) -> Path:
    """A `layers`-layer, 32-wide BERT with the demo model's tokenizer, saved as a model directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inferforge.models import demo_model_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size or 30522, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(path)
    return Path(path)


def tiny_bert_teacher(path: Path, layers: int = 3):
    from inferforge.optimize.distill_student import load_teacher

    return load_teacher(save_tiny_bert(path, layers=layers))
