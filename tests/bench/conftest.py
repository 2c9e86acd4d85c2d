import pytest

from tests.bench.fake_async_engine import install_if_missing


@pytest.fixture
def async_engine(monkeypatch):
    """`inferforge.runtime.async_engine.AsyncEngine`, or the fake of its interface while the real one is not merged."""
    return install_if_missing(monkeypatch)
