"""Paged KV cache: block pools, a block allocator with prefix sharing, and the `append_kv` kernel.

Layout: per layer, K and V pools `[num_blocks, block_size, n_kv_heads, head_dim]`. A sequence owns
a list of physical blocks (its block table); token t of the sequence lives in block
`table[t // block_size]` at slot `t % block_size`, i.e. at flat slot `block * block_size + offset`.

Prefix sharing: a full block is identified by the hash chain of the token ids up to its end. Once
its K/V have been computed (`mark_computed`), a new sequence whose prompt starts with the same whole
blocks reuses them (reference-counted) and skips their prefill; freed prefix blocks stay reusable
until the allocator needs them for something else. A write into a block that other sequences still
reference copies it first (copy-on-write).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import check, check_tensor, reference_fallback

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn,
                "int8": torch.int8}
QUANT_NONE, QUANT_INT8, QUANT_FP8 = 0, 1, 2


@triton.jit
def _append_kv_kernel(
    K, V,                        # [num_tokens, n_kv_heads, d]
    KCache, VCache,              # [num_blocks, block_size, n_kv_heads, d]
    SlotMapping,                 # int32/int64 [num_tokens]; -1 = skip
    KScale, VScale,              # float32 [n_kv_heads] (quantized caches)
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    block_size,
    N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
):
    """One program per new token: all its KV heads, quantized on the way in for int8/fp8 caches."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    offs_h = tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < N_KV
    mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    if QUANT != 0:
        k = k.to(tl.float32) / tl.load(KScale + offs_h, mask=h_mask, other=1.0)[:, None]
        v = v.to(tl.float32) / tl.load(VScale + offs_h, mask=h_mask, other=1.0)[:, None]
        if QUANT == 1:
            # Round half away from zero, then saturate to the symmetric int8 range.
            k = tl.minimum(tl.maximum(tl.where(k >= 0, tl.floor(k + 0.5), tl.ceil(k - 0.5)), -127.0), 127.0)
            v = tl.minimum(tl.maximum(tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5)), -127.0), 127.0)
        else:
            k = tl.minimum(tl.maximum(k, -448.0), 448.0)      # e4m3's largest finite value
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    tl.store(KCache + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
             k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(VCache.dtype.element_ty), mask=mask)


def append_kv(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Write new tokens' K/V `[num_tokens, n_kv_heads, head_dim]` into their cache slots, in place.

    `slot_mapping` (int32 or int64 `[num_tokens]`) gives each token's flat slot
    `block * block_size + offset`; -1 skips the token (padding). int8 and float8_e4m3fn caches
    quantize on write with float32 per-KV-head `k_scale`/`v_scale` `[n_kv_heads]` (x / scale, int8
    rounded and clamped to +-127, fp8 saturated at +-448).
    """
    from inferforge.kernels.decode_attention import _check_cache_args

    check_tensor("k", k, dims=3, layout="[num_tokens, n_kv_heads, head_dim]")
    check(isinstance(v, torch.Tensor) and v.shape == k.shape and v.dtype == k.dtype,
          f"v must match k's shape and dtype {tuple(k.shape)} {k.dtype}, got {getattr(v, 'dtype', None)} "
          f"{tuple(getattr(v, 'shape', ()))}")
    num_tokens, n_kv, head_dim = k.shape
    _check_cache_args("k_cache", k_cache, "v_cache", v_cache, k_scale, v_scale, n_kv, head_dim, k.dtype)
    check_tensor("slot_mapping", slot_mapping, dims=1, layout="int32/int64 [num_tokens]")
    check(slot_mapping.dtype in (torch.int32, torch.int64) and slot_mapping.shape[0] == num_tokens,
          f"slot_mapping must be int32 or int64 [num_tokens={num_tokens}], got {slot_mapping.dtype} "
          f"{tuple(slot_mapping.shape)}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        check(t.device == k.device, f"{name} must be on {k.device} like k, got {t.device}")
    check(k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1,
          "k, v and the caches must be contiguous in their last dimension; pass .contiguous()")
    capacity = k_cache.shape[0] * k_cache.shape[1]
    lowest = 0
    if not k.is_cuda and num_tokens:
        lowest = int(slot_mapping.min())
        check(int(slot_mapping.max()) < capacity and lowest >= -1,
              f"slot_mapping must hold -1 or slots below num_blocks * block_size = {capacity}")
    if not (k.is_cuda or _INTERPRET) and k_cache.dtype == k.dtype and k_cache.is_contiguous() \
            and v_cache.is_contiguous():
        # CPU, float cache: row copies into the flat [slots, n_kv, d] views (no quantization to do).
        if lowest < 0:      # drop the padding tokens (slot -1)
            keep = slot_mapping >= 0
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        write_kv_rows(k, v, k_cache, v_cache, slot_mapping.long())
        return
    if not (k.is_cuda or _INTERPRET):
        from inferforge.kernels.reference import append_kv_reference

        reference_fallback("append_kv")
        append_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        return
    quant = {torch.int8: QUANT_INT8, torch.float8_e4m3fn: QUANT_FP8}.get(k_cache.dtype, QUANT_NONE)
    if num_tokens == 0:
        return
    # The kernel indexes these small vectors with unit stride.
    slot_mapping = slot_mapping.contiguous()
    if quant:
        k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
    _append_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale if quant else k, v_scale if quant else v,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        k_cache.shape[1], N_KV=n_kv, HEAD_DIM=head_dim, BLOCK_KV=triton.next_power_of_2(n_kv),
        BLOCK_D=triton.next_power_of_2(head_dim), QUANT=quant, num_warps=4,
    )


def cpu_row_write_slots(slot_mapping, k_cache, v_cache, dtype) -> torch.Tensor | None:
    """The int64 slots for `write_kv_rows` when `append_kv` would take its CPU row-copy path for
    these caches and new K/V of `dtype` (a float cache of that dtype, contiguous, no padding slot,
    every slot in range); None otherwise. A model checks once per step, then writes every layer."""
    if k_cache.is_cuda or _INTERPRET or k_cache.dtype != dtype or v_cache.dtype != dtype \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or slot_mapping.dim() != 1:
        return None
    capacity = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.numel() and not (int(slot_mapping.min()) >= 0 and int(slot_mapping.max()) < capacity):
        return None
    return slot_mapping.long()


def write_kv_rows(k, v, k_cache, v_cache, slots: torch.Tensor) -> None:
    """`append_kv` for slots from `cpu_row_write_slots`: two row copies, no checks."""
    k_cache.view(-1, k.shape[1], k.shape[2]).index_copy_(0, slots, k)
    v_cache.view(-1, v.shape[1], v.shape[2]).index_copy_(0, slots, v)


class OutOfBlocks(RuntimeError):
    """The cache has no free block left for a new token."""


class PagedKVCache:
    """K/V pools for every layer plus the block allocator and per-sequence block tables.

    Sequences are identified by any hashable id. Typical use per step: `add_sequence(id, prompt)`
    (returns how many prompt tokens are already cached through shared blocks), `slots(id, n)` to
    reserve slots for n new tokens (pass them to `append_kv`), `mark_computed(id)` after their K/V
    are written, `block_tables(ids)` / `seq_lens(ids)` for the attention kernels, `free(id)`.
    """

    def __init__(self, *, num_layers: int, num_blocks: int, n_kv_heads: int, head_dim: int, block_size: int = 16,
                 dtype: torch.dtype | str = torch.float16, device="cpu", k_scales=None, v_scales=None):
        dtype = CACHE_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        check(dtype in CACHE_DTYPES.values(), f"dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype}")
        check(num_layers >= 1 and num_blocks >= 1 and block_size >= 1 and n_kv_heads >= 1 and head_dim >= 1,
              "num_layers, num_blocks, block_size, n_kv_heads and head_dim must all be >= 1")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, torch.device(device)
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        # Not zero-filled: every reader (append_kv's targets aside) loads only slots below a sequence's
        # length, with masked loads (other=0) in the kernels and slicing in the references, so unwritten
        # slots are never read; a test poisons the pools with NaN to hold this.
        self.k_pools = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pools = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.quantized = dtype in (torch.int8, torch.float8_e4m3fn)
        if self.quantized:
            # Per layer, per KV head; 1.0 until calibrated (KV-cache quantization calibrates them).
            ones = torch.ones(num_layers, n_kv_heads, dtype=torch.float32, device=device)
            self.k_scales = ones.clone() if k_scales is None else torch.as_tensor(k_scales, dtype=torch.float32, device=device)
            self.v_scales = ones.clone() if v_scales is None else torch.as_tensor(v_scales, dtype=torch.float32, device=device)
            check(self.k_scales.shape == (num_layers, n_kv_heads) and self.v_scales.shape == (num_layers, n_kv_heads),
                  f"k_scales and v_scales must be [num_layers={num_layers}, n_kv_heads={n_kv_heads}]")
        else:
            self.k_scales = self.v_scales = None
        self._free = list(range(num_blocks - 1, -1, -1))       # a stack: pop() gives block 0 first
        self._refs = [0] * num_blocks
        self._tables: dict = {}
        self._lens: dict = {}
        self._tokens: dict = {}
        self._computed: dict = {}           # tokens whose K/V are written, per sequence
        self._prefix: dict[bytes, int] = {}   # hash chain of a full, computed block -> block
        self._block_hash: dict[int, bytes] = {}
        self.allocations = 0                # blocks handed out so far (a statistic)
        self.reused_tokens = 0              # prompt tokens served from shared prefix blocks

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.n_kv_heads * self.head_dim * self.k_pools[0].element_size()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def _allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"the KV cache is full: all {self.num_blocks} blocks of {self.block_size} tokens are in use")
        block = self._free.pop()
        key = self._block_hash.pop(block, None)      # reusing a cached prefix block evicts its contents
        if key is not None and self._prefix.get(key) == block:
            del self._prefix[key]
        self._refs[block] = 1
        self.allocations += 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._block_hash:
                # A computed prefix block stays findable until it is needed again: free blocks are
                # taken from the end, so cached ones go to the front (least recently freed first out).
                self._free.insert(0, block)
            else:
                self._free.append(block)

    @staticmethod
    def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
        """sha256 over the parent block's key and this block's token ids: crafted prompts cannot make two
        different prefixes collide (Python's hash() could), so no request reads another's K/V."""
        return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id, token_ids: Sequence[int], *, share: bool = True) -> int:
        """Register a sequence with its prompt; returns the number of leading prompt tokens whose K/V
        are already in the cache (whole shared blocks), which need no prefill. `share=False` for
        sequences whose blocks will be rewritten in place (sliding window)."""
        check(seq_id not in self._tables, f"sequence {seq_id!r} is already in the cache")
        table, parent, reused = [], b"", 0
        full = len(token_ids) // self.block_size if share else 0
        for i in range(full):
            key = self._chain(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self._prefix.get(key)
            # Never share the block holding the last prompt token: its logits must be computed anyway.
            if block is None or (i + 1) * self.block_size >= len(token_ids):
                break
            if self._refs[block] == 0:       # cached but free: take it back from the free list
                self._free.remove(block)
            self._refs[block] += 1
            table.append(block)
            parent, reused = key, reused + self.block_size
        self._tables[seq_id] = table
        self._lens[seq_id] = reused
        self._computed[seq_id] = reused
        self._tokens[seq_id] = list(token_ids)
        self.reused_tokens += reused
        return reused

    def slots(self, seq_id, num_new: int) -> torch.Tensor:
        """Reserve slots for the next `num_new` tokens of a sequence; int64 `[num_new]` flat slots.

        Allocates blocks as needed and copies a shared block before the first write into it."""
        table, length = self._tables[seq_id], self._lens[seq_id]
        need = max(self.blocks_needed(length + num_new) - len(table), 0)
        copy = num_new > 0 and length % self.block_size != 0 and self._refs[table[-1]] > 1
        if need + copy > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id!r} needs {need + copy} more blocks of {self.block_size} tokens, "
                              f"{len(self._free)} are free")
        if copy:
            self._copy_on_write(seq_id, len(table) - 1)
        for _ in range(need):
            table.append(self._allocate())
        positions = torch.arange(length, length + num_new)
        blocks = torch.tensor(table, dtype=torch.int64)[positions // self.block_size]
        self._lens[seq_id] = length + num_new
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def next_slot(self, seq_id) -> int:
        """`slots(seq_id, 1)` as a Python int: the decode step's one new token, without a tensor."""
        table, length = self._tables[seq_id], self._lens[seq_id]
        if length % self.block_size == 0 or self._refs[table[-1]] > 1:
            return int(self.slots(seq_id, 1))       # a new block, or a copy-on-write first
        self._lens[seq_id] = length + 1
        return table[length // self.block_size] * self.block_size + length % self.block_size

    def extend_tokens(self, seq_id, token_ids: Sequence[int]) -> None:
        """Record generated token ids (they make later blocks shareable by prefix)."""
        self._tokens[seq_id].extend(token_ids)

    def _copy_on_write(self, seq_id, index: int) -> None:
        table = self._tables[seq_id]
        old = table[index]
        new = self._allocate()
        for pool in (*self.k_pools, *self.v_pools):
            pool[new].copy_(pool[old])
        self._release(old)
        table[index] = new

    def mark_computed(self, seq_id, num_tokens: int | None = None) -> None:
        """Declare the K/V of the first `num_tokens` (default: all reserved) tokens written; their
        full blocks become shareable by later sequences with the same prefix."""
        num_tokens = self._lens[seq_id] if num_tokens is None else num_tokens
        tokens, table = self._tokens[seq_id], self._tables[seq_id]
        parent = b""
        for i in range(min(num_tokens, len(tokens)) // self.block_size):
            key = self._chain(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            self._prefix.setdefault(key, table[i])
            self._block_hash.setdefault(table[i], key)
            parent = key
        self._computed[seq_id] = max(self._computed[seq_id], num_tokens)

    def fork(self, parent_id, child_id) -> None:
        """A new sequence sharing every block of `parent_id` (parallel sampling); writes copy on demand."""
        check(child_id not in self._tables, f"sequence {child_id!r} is already in the cache")
        table = list(self._tables[parent_id])
        for block in table:
            self._refs[block] += 1
        self._tables[child_id] = table
        self._lens[child_id] = self._lens[parent_id]
        self._computed[child_id] = self._computed[parent_id]
        self._tokens[child_id] = list(self._tokens[parent_id])

    def evict_block(self, seq_id, index: int) -> None:
        """Drop the `index`-th (full) block of a sequence; the tokens after it move one block earlier.

        For sliding-window attention: keys after it must be re-rotated to their new positions."""
        table = self._tables[seq_id]
        check(0 <= index < len(table) - 1, f"cannot evict block {index} of a sequence with {len(table)} blocks")
        self._release(table.pop(index))
        bs = self.block_size
        self._lens[seq_id] -= bs
        self._computed[seq_id] = max(0, self._computed[seq_id] - bs)
        del self._tokens[seq_id][index * bs:(index + 1) * bs]

    def cached_tokens(self, seq_id) -> list[int]:
        """The token ids whose K/V the sequence holds, in cache order."""
        return self._tokens[seq_id][: self._lens[seq_id]]

    def free(self, seq_id) -> None:
        # Last block first: the free stack then hands the blocks out again in table order, so the next
        # sequence gets consecutive blocks (the CPU decode path reads those without a gather).
        for block in reversed(self._tables.pop(seq_id)):
            self._release(block)
        for d in (self._lens, self._computed, self._tokens):
            d.pop(seq_id)

    def seq_len(self, seq_id) -> int:
        return self._lens[seq_id]

    def block_table(self, seq_id) -> list[int]:
        return list(self._tables[seq_id])

    def block_tables(self, seq_ids) -> torch.Tensor:
        """int32 `[batch, max_blocks]`, padded with block 0 (never read: seq_lens bound the reads)."""
        tables = [self._tables[s] for s in seq_ids]
        width = max((len(t) for t in tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.device).reshape(len(tables), width)

    def seq_lens(self, seq_ids) -> torch.Tensor:
        return torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32, device=self.device)
