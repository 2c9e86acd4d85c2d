"""The `slow` list in tests/conftest.py names tests that exist: a renamed test would silently join the
quick run."""

from pathlib import Path

import pytest

from tests.conftest import SLOW_TESTS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("node_id", sorted(SLOW_TESTS))
def test_slow_test_exists(node_id):
    path, name = node_id.split("::")
    assert f"def {name}(" in (REPO / path).read_text(), f"{node_id} is gone: update SLOW_TESTS in tests/conftest.py"
