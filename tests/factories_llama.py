"""Tiny seeded random Llama-family checkpoints, written to disk like a Hugging Face download."""

from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_tiny_llama(path: Path, *, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_word_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer whose words are w0 .. w{n-1}; ids 0-2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)


def save_word_text(path: Path, *, lines: int = 40, words: int = 40, vocab_size: int = 256, seed: int = 0) -> Path:
    """Calibration text for `save_word_tokenizer`: `lines` lines of `words` random words, seeded."""
    import random

    rng = random.Random(seed)
    text = [" ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(words)) for _ in range(lines)]
    Path(path).write_text("\n".join(text) + "\n")
    return Path(path)
