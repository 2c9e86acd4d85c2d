"""Triton kernels with PyTorch references. Importing this package needs only torch (and triton for kernels)."""

__all__: list[str] = []
