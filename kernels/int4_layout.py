"""Int4 weight layouts: how two 4-bit codes share a byte, named and versioned.

A layout is recorded per layer in the artifact's quantization.json (`"layout"`; an entry without it
is `int4-kpairs-v0`, the only layout before the field existed) and on `Int4WeightOnlyLinear.layout`.
Every reader of packed int4 bytes asks for the layout it understands through `to_layout`.

Both layouts store row n of the `[N, K]` codes (0..15) as K // 2 bytes `[N, K // 2]`; they differ in
which k each nibble holds (lo = bits 0-3, hi = bits 4-7):

    int4-kpairs-v0       byte j:  lo = k 2j,       hi = k 2j + 1
                         bytes    | 0,1 | 2,3 | 4,5 | ... |

    int4-interleaved-v1  in each unit of 32 k (16 bytes), byte 16u + i:  lo = k 32u + i,  hi = k 32u + 16 + i
                         bytes    | 0,16 | 1,17 | ... | 15,31 || 32,48 | 33,49 | ... | 47,63 || ...
                         lo nibbles of a unit = k 0..15, hi nibbles = k 16..31

Why the second one: a kernel that loads a tile of bytes gets two contiguous halves of k from
`packed & 0xF` and `packed >> 4`, with no register interleave (`tl.join` + reshape) to restore k
order. The tensor-core path runs one dot per half against x's matching 16-element runs; the GEMV
meets each half with contiguous (vectorizable) runs of x instead of x's even and odd entries. A unit
lies inside one quantization group when the group size is a multiple of 32, so both nibbles of a byte
share one scale and zero; group 16 keeps `int4-kpairs-v0`.

`int4-kpairs-v0` stays the default for layers built on the CPU and is what the ONNX MatMulNBits
export and torch's CPU int4 paths read (converted at their boundary when a layer holds another).
"""

from __future__ import annotations

import torch

from inferforge.errors import UserInputError

KPAIRS = "int4-kpairs-v0"
INTERLEAVED = "int4-interleaved-v1"
LAYOUTS = (KPAIRS, INTERLEAVED)
UNIT = 32                      # k per interleaved unit (16 bytes: one 128-bit load per row)


def check_layout(layout: str, *, k: int | None = None, group: int | None = None) -> None:
    """A clear error for an unknown layout, or an interleaved one that cannot hold this shape."""
    if layout not in LAYOUTS:
        raise UserInputError(f"int4 layout {layout!r} is not known to this version of inferforge (known: "
                             f"{', '.join(LAYOUTS)}); upgrade inferforge or re-quantize the model")
    if layout == INTERLEAVED:
        if k is not None and k % UNIT:
            raise UserInputError(f"{INTERLEAVED} needs in_features to be a multiple of {UNIT}, got {k}; use {KPAIRS}")
        if group is not None and group % UNIT:
            raise UserInputError(f"{INTERLEAVED} needs a group size that is a multiple of {UNIT}, got {group}; "
                                 f"use {KPAIRS}")


def kernel_layout(device, group: int, k: int) -> str:
    """The layout the w4a16 kernels run fastest on for `device`: interleaved on CUDA where the shape
    allows it, else `int4-kpairs-v0` (the CPU paths' layout)."""
    device = torch.device(device)
    return INTERLEAVED if device.type == "cuda" and group % UNIT == 0 and k % UNIT == 0 else KPAIRS


def pack(q: torch.Tensor, layout: str = KPAIRS) -> torch.Tensor:
    """Codes 0..15 `[N, K]` (any integer dtype) -> uint8 `[N, K // 2]` in `layout`."""
    n, k = q.shape
    check_layout(layout, k=k)
    q = q.to(torch.uint8)
    if layout == KPAIRS:
        if k % 2:
            raise UserInputError(f"int4 packing needs an even in_features, got {k}")
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    units = q.reshape(n, k // UNIT, 2, UNIT // 2)           # [n, unit, half, i]
    return (units[:, :, 0] | (units[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack(packed: torch.Tensor, layout: str = KPAIRS) -> torch.Tensor:
    """uint8 `[N, K // 2]` in `layout` -> codes uint8 `[N, K]` in k order."""
    n, k = packed.shape[0], packed.shape[1] * 2
    check_layout(layout, k=k)
    if layout == KPAIRS:
        return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(n, k)
    units = packed.reshape(n, k // UNIT, UNIT // 2)
    return torch.stack([units & 0xF, units >> 4], dim=2).reshape(n, k)


def to_layout(packed: torch.Tensor, from_layout: str, to_layout: str, n: int, k: int, group: int) -> torch.Tensor:
    """`packed` (uint8 `[n, k // 2]`, quantization groups of `group`) re-packed from `from_layout` to
    `to_layout`; the same tensor when they are equal. Exact: the codes are only moved."""
    check_layout(from_layout, k=k, group=group)
    check_layout(to_layout, k=k, group=group)
    if tuple(packed.shape) != (n, k // 2) or packed.dtype != torch.uint8:
        raise UserInputError(f"packed int4 weights must be uint8 [{n}, {k // 2}], got {packed.dtype} "
                             f"{tuple(packed.shape)}")
    if from_layout == to_layout:
        return packed
    return pack(unpack(packed, from_layout), to_layout)
