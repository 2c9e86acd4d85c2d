import pytest

from inferforge.data import read_sentences, split_sentences
from inferforge.errors import UserInputError


def test_demo_split_is_disjoint_and_sized():
    split = split_sentences("demo", 160, 320)
    assert len(split.calibration) == 160 and len(split.held_out) == 320
    assert not set(split.calibration) & set(split.held_out)
    assert all(len(s) >= 40 for s in split.held_out)         # real sentences, not fragments


def test_read_sentences_skips_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# a comment\nfirst\n\n  second  \nfirst\n")
    assert read_sentences(str(path)) == ["first", "second"]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="sentence file not found"):
        read_sentences(str(tmp_path / "nope.txt"))


def test_length_buckets_cover_short_ordinary_and_long_inputs_without_overlap():
    from inferforge.data import with_length_buckets
    from tests.factories import demo_tokenizer_counter

    count_tokens = demo_tokenizer_counter()
    split = with_length_buckets(split_sentences("demo", 160, 320), count_tokens=count_tokens, max_tokens=256)
    buckets = split.buckets()
    assert list(buckets) == ["short", "ordinary", "long"]
    assert {b: len(i) for b, i in buckets.items()} == {"short": 80, "ordinary": 320, "long": 40}
    short = [split.held_out[i] for i in buckets["short"]]
    assert all(1 <= len(s.split()) <= 3 for s in short) and {len(s.split()) for s in short} == {1, 2, 3}
    long = [count_tokens(split.held_out[i]) for i in buckets["long"]]
    assert min(long) >= 0.75 * 256 and max(long) >= 256                  # up to (and past) the model's limit
    assert [split.held_out[i] for i in buckets["ordinary"]] == list(split_sentences("demo", 160, 320).held_out)
    # Calibration covers the lengths too, and never shares a text with the held-out set.
    cal_lengths = [count_tokens(s) for s in split.calibration]
    assert len(split.calibration) == 160 + 40 + 20
    assert min(cal_lengths) <= 4 and max(cal_lengths) >= 256
    assert not set(split.calibration) & set(split.held_out)
    again = with_length_buckets(split_sentences("demo", 160, 320), count_tokens=count_tokens, max_tokens=256)
    assert again == split                                                # deterministic
