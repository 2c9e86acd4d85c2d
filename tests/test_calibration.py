import json

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.optimize.calibration import load_token_batches, observe_range, read_texts
from tests.factories_llama import save_word_tokenizer


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_word_tokenizer(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_text_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w5 w6 w7\n\nw8 w9\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "w5 w6 w7"}) + "\n" + json.dumps({"text": "w8 w9"}) + "\n")
    assert read_texts(tmp_path / "a.txt") == read_texts(tmp_path / "a.jsonl") == ["w5 w6 w7", "w8 w9"]
    batches = load_token_batches(tmp_path / "a.txt", tokenizer, num_samples=3, seq_len=2)
    assert [b.tolist() for b in batches] == [[[5, 6]], [[7, 2]], [[8, 9]]]      # </s> (2) between documents


def test_clear_errors(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "w5"}\n{"txt": 1}\n')
    with pytest.raises(UserInputError, match=r"bad.jsonl, line 2: expected an object with a \"text\" string"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(UserInputError, match="calibration file not found"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("w5 w6\n")
    with pytest.raises(UserInputError, match="make 1 sequences of 2; 5 were asked for"):
        load_token_batches(tmp_path / "short.txt", tokenizer, num_samples=5, seq_len=2)


def test_observers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, 2, generator=g)
    x[0, 1] = 100.0                                  # one outlier in channel 1
    minmax, pct = observe_range(x, "minmax"), observe_range(x, "percentile")
    assert minmax[1] == 100.0 and pct[1] < 10        # the percentile clips the lone outlier
    # Heavy tails (Student-t, 2 degrees of freedom): clipping lowers the int8 round-trip error.
    heavy = torch.distributions.StudentT(2.0).sample((20000, 1))
    mse = observe_range(heavy, "mse")
    assert mse[0] < observe_range(heavy, "minmax")[0]

    def roundtrip_error(clip):
        scale = clip / 127
        return ((torch.round(heavy.abs().clamp(max=clip) / scale) * scale - heavy.abs()) ** 2).mean()

    assert roundtrip_error(mse[0]) < roundtrip_error(observe_range(heavy, "minmax")[0])
    with pytest.raises(UserInputError, match="observer 'max'"):
        observe_range(x, "max")
