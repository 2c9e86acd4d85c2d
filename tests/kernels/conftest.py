"""Every kernel test must run the Triton kernel (compiled on a GPU, interpreted on the CPU under
TRITON_INTERPRET=1), never the PyTorch reference the public ops fall back to elsewhere: a fallback
compares the reference with itself and passes whatever the kernel does. A test marked
`reference_fallback` checks the fallback itself."""

import pytest

from inferforge.kernels import _checks


@pytest.fixture(autouse=True)
def triton_path_ran(request):
    _checks.REFERENCE_FALLBACKS.clear()
    yield
    fallbacks = dict(_checks.REFERENCE_FALLBACKS)
    if request.node.get_closest_marker("reference_fallback"):
        return
    assert not fallbacks, (f"the PyTorch reference ran instead of the Triton kernel ({fallbacks}): set "
                           "TRITON_INTERPRET=1 before triton is imported (tests/conftest.py does) or run on a GPU")
