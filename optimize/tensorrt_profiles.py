"""TensorRT optimization profiles for an ONNX graph: a min / opt / max shape for every input.

TensorRT builds an engine for a range of shapes: every dynamic dimension of every input needs a
minimum, an optimum (the shape its kernels are tuned for) and a maximum. `default_profiles` sizes
the dimensions optimum-onnx names (`batch_size`, `sequence_length`, `past_sequence_length` and sums
such as `past_sequence_length + sequence_length`); `profile_problems` checks a profile against the
graph. Profiles are plain JSON: `{input: {"min": [...], "opt": [...], "max": [...]}}`.
"""

from __future__ import annotations

from pathlib import Path

from inferforge.errors import UserInputError

PROFILE_KEYS = ("min", "opt", "max")


def graph_inputs(model) -> list[tuple[str, int, list]]:
    """(name, ONNX element type, dims) of each real input of `model` (initializers listed as inputs
    are left out); a dim is an int when static, else its dim_param string ('' when unnamed)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        inputs.append((value.name, tensor.elem_type, dims))
    return inputs


def _has_past(dim_params: set[str]) -> bool:
    return any("past" in p for p in dim_params)


def _symbol_range(symbol: str, *, has_past: bool, max_batch: int, max_sequence: int, max_past: int):
    """(min, opt, max) for one named dimension, or None when the name is not one we know."""
    name = symbol.strip().lower()
    if "batch" in name:
        return 1, max(1, max_batch // 2), max_batch
    if "past" in name:
        # The first step of a decoder passes empty past tensors, so the range starts at 0
        # (TensorRT accepts zero-length dimensions in a profile).
        return 0, max_past // 2, max_past
    if "sequence" in name or name in ("seq_len", "seq_length", "tokens"):
        # A decoder with past runs mostly one-token steps: tune for those. An encoder (no past)
        # is tuned for half the longest input.
        return 1, 1 if has_past else max(1, max_sequence // 2), max_sequence
    return None


def default_profiles(onnx_path: str | Path, *, max_batch: int = 8, max_sequence: int = 512,
                     max_past: int = 512) -> dict:
    """A min / opt / max shape for every input of the graph at `onnx_path`.

    batch: 1 / max_batch // 2 / max_batch; sequence: 1 / 1 (decoder with past) or
    max_sequence // 2 (encoder) / max_sequence; past_sequence_length: 0 / max_past // 2 / max_past;
    a dim named `a + b` gets the sum of both ranges, so `attention_mask`'s last axis agrees with
    the past and the new tokens at each of min, opt and max. Static dims keep their value.
    Raises UserInputError for a dynamic dim whose name says nothing about its size.
    """
    import onnx

    if max_batch < 1 or max_sequence < 1 or max_past < 0:
        raise UserInputError(f"profile limits must be positive (got max_batch={max_batch}, "
                             f"max_sequence={max_sequence}, max_past={max_past})")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = graph_inputs(model)
    has_past = _has_past({d for _, _, dims in inputs for d in dims if isinstance(d, str)})
    profiles = {}
    for name, _, dims in inputs:
        shape = {key: [] for key in PROFILE_KEYS}
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                values = (dim, dim, dim)
            else:
                parts = [_symbol_range(p, has_past=has_past, max_batch=max_batch, max_sequence=max_sequence,
                                       max_past=max_past) for p in dim.split("+")] if dim else [None]
                if any(p is None for p in parts):
                    raise UserInputError(f"input '{name}' axis {axis} is dynamic ('{dim or 'unnamed'}') and its size "
                                         "cannot be guessed from its name; write the profile yourself "
                                         "({input: {min, opt, max}})")
                values = tuple(sum(p[i] for p in parts) for i in range(3))
            for key, value in zip(PROFILE_KEYS, values):
                shape[key].append(value)
        profiles[name] = shape
    return profiles


def model_profiles(onnx_path: str | Path, *, position_limit: int | None, max_batch: int = 8,
                   max_sequence: int | None = None) -> dict:
    """`default_profiles` sized to what the model can take: `position_limit` is its
    `max_position_embeddings` (None: unknown), `max_sequence` the longest sequence asked for.

    An encoder: inputs of up to `max_sequence` tokens (default min(512, position_limit)).
    A decoder with past: `max_sequence` (default min(4096, position_limit)) is the whole context,
    past + new tokens. A profile bounds each dimension on its own and cannot state "past + sequence
    <= context", so the context is split: new tokens per call up to half of it (a prompt prefilled
    in one call), past up to the rest. `attention_mask` (past + sequence) then ends at the context
    and no shape in the profile runs past the model's positions. Raises UserInputError when
    `max_sequence` exceeds `position_limit`."""
    import onnx

    inputs = graph_inputs(onnx.load(str(onnx_path), load_external_data=False))
    decoder = _has_past({d for _, _, dims in inputs for d in dims if isinstance(d, str)})
    cap = 4096 if decoder else 512
    if max_sequence is not None and (max_sequence < 1 or (position_limit and max_sequence > position_limit)):
        raise UserInputError(f"--max-sequence {max_sequence}: the model takes 1 to {position_limit or 'any'} tokens "
                             f"(max_position_embeddings); choose a value in that range")
    if max_batch < 1:
        raise UserInputError(f"--max-batch {max_batch}: must be at least 1")
    longest = max_sequence or min(cap, position_limit or cap)
    if not decoder:
        return default_profiles(onnx_path, max_batch=max_batch, max_sequence=longest, max_past=0)
    new_tokens = max(1, longest // 2)
    return default_profiles(onnx_path, max_batch=max_batch, max_sequence=new_tokens, max_past=longest - new_tokens)


def position_problems(inputs: list[tuple[str, int, list]], profiles: dict, position_limit: int) -> list:
    """(input name, problem) for every sequence axis (a dim named after a sequence, a past or a sum of
    them) whose profile max exceeds the model's `position_limit` tokens: such shapes fail at run time
    (an encoder's position-embedding lookup) or leave the positions the model was trained on."""
    problems = []
    for name, _, dims in inputs:
        profile = profiles.get(name)
        if not isinstance(profile, dict) or not isinstance(profile.get("max"), list):
            continue
        for axis, dim in enumerate(dims):
            parts = dim.split("+") if isinstance(dim, str) and dim else []
            # Known symbols other than the batch: sequence, past, and their sums.
            sequence_axis = bool(parts) and not any("batch" in p.lower() for p in parts) and all(
                _symbol_range(p, has_past=True, max_batch=1, max_sequence=1, max_past=1) for p in parts)
            high = profile["max"][axis] if axis < len(profile["max"]) else None
            if sequence_axis and isinstance(high, int) and high > position_limit:
                problems.append((name, f"axis {axis} ('{dim}') goes up to {high}, past the model's {position_limit} "
                                       "positions (max_position_embeddings); lower the profile's max"))
    return problems


def profile_problems(inputs: list[tuple[str, int, list]], profiles: dict) -> list[tuple[str, str]]:
    """(input name, problem) for every dynamic dim the profile leaves uncovered or gets wrong."""
    problems = []
    names = {name for name, _, _ in inputs}
    for extra in sorted(set(profiles) - names):
        problems.append((extra, "the profile names an input the graph does not have"))
    symbol_ranges: dict[str, tuple] = {}   # dim_param -> ((min, opt, max), input, axis) where first seen
    for name, _, dims in inputs:
        dynamic = [axis for axis, dim in enumerate(dims) if not isinstance(dim, int) or dim <= 0]
        profile = profiles.get(name)
        if profile is None:
            if dynamic:
                problems.append((name, f"dynamic axes {dynamic} have no profile (min/opt/max)"))
            continue
        shapes = [profile.get(key) for key in PROFILE_KEYS] if isinstance(profile, dict) else [None]
        if any(not isinstance(s, list) or len(s) != len(dims) for s in shapes):
            problems.append((name, f"the profile needs min, opt and max lists of rank {len(dims)}"))
            continue
        for axis, dim in enumerate(dims):
            values = tuple(s[axis] for s in shapes)
            low, opt, high = values
            if not all(isinstance(v, int) for v in values) or not 0 <= low <= opt <= high:
                problems.append((name, f"axis {axis}: needs integers 0 <= min <= opt <= max, got {low}/{opt}/{high}"))
            elif isinstance(dim, int) and dim > 0 and not low == opt == high == dim:
                problems.append((name, f"axis {axis} is static ({dim}) but the profile gives {low}/{opt}/{high}"))
            elif isinstance(dim, str) and dim:
                seen = symbol_ranges.setdefault(dim, (values, name, axis))[0]
                if seen != values:
                    problems.append((name, f"axis {axis} ('{dim}') gets {_fmt(values)} here but {_fmt(seen)} on "
                                           "another input; one dimension needs one range"))
    # `past_sequence_length + sequence_length` must be the sum of its parts at min, opt and max, or
    # the profile holds shapes no real call has (and the engine build fails on the mismatch).
    for dim, (values, name, axis) in symbol_ranges.items():
        parts = [p.strip() for p in dim.split("+")]
        if len(parts) > 1 and all(p in symbol_ranges for p in parts):
            expected = tuple(sum(symbol_ranges[p][0][i] for p in parts) for i in range(3))
            if expected != values:
                problems.append((name, f"axis {axis} ('{dim}') gets {_fmt(values)}, not the sum of its parts "
                                       f"{_fmt(expected)}"))
    return problems


def _fmt(values) -> str:
    return "/".join(str(v) for v in values)


def shape_arg(profiles: dict, key: str) -> str:
    """trtexec's shape syntax: `name:1x16,other:1x2x0x8`."""
    return ",".join(f"{name}:{'x'.join(str(v) for v in shape[key])}" for name, shape in profiles.items())
