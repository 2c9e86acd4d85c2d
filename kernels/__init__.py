"""Triton kernels, each with a plain PyTorch reference in `inferforge.kernels.reference`.

Kernels run on CUDA tensors, and on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1 is
set before triton is imported; on CPU otherwise the reference runs.
"""

from inferforge.kernels.act_quant import quantize_rows
from inferforge.kernels.attention import flash_attention
from inferforge.kernels.decode_attention import paged_decode_attention
from inferforge.kernels.int8_matmul import int8_matmul
from inferforge.kernels.kv_cache import OutOfBlocks, PagedKVCache, append_kv
from inferforge.kernels.reference import attention_reference
from inferforge.kernels.weight_only_matmul import w4a16_matmul, w8a16_matmul

__all__ = ["flash_attention", "attention_reference", "paged_decode_attention", "append_kv", "PagedKVCache",
           "OutOfBlocks", "w8a16_matmul", "w4a16_matmul", "int8_matmul", "quantize_rows"]
