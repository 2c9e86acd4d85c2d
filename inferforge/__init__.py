"""inferforge: take a model from "works in the notebook" to "holds its latency target in production".

`inferforge.load(DIR)` imports an optimized artifact; the `inferforge` command line runs recipes.
Subpackages: `inferforge.kernels` (Triton kernels), `inferforge.optimize` (export, quantization,
validation), `inferforge.bench` (benchmark harness and reports).
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an artifact directory as a runnable model; see `inferforge.artifact.load`."""
    from inferforge.artifact import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
