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
