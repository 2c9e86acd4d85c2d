"""One way to get an `LLMEngine` from what the commands accept: a causal-LM artifact (through
`inferforge.load`, which verifies the manifest and every file first) or a Llama-family checkpoint
directory. `generate`, `serve` and the in-process serving benchmark all go through `load_engine`."""

from __future__ import annotations

from pathlib import Path

from inferforge.artifact import LLM_KINDS, ONNX_LLM_KIND
from inferforge.errors import UserInputError

# Engine keyword arguments an exported ONNX decoder has no use for, with the flag that sets each.
ENGINE_ONLY_FLAGS = {"memory_budget": "--memory-budget", "memory_utilization": "--memory-utilization",
                     "cpu_packed_linears": "--cpu-linears"}


def load_engine(path: str | Path, *, command: str, **engine_kwargs):
    """The engine for `path`; a path that does not exist is one line, an artifact of another kind (an
    encoder) is refused naming `command`. An exported decoder (kind `onnx-causal-lm`) gives an
    `OnnxDecoder`, which has the engine's generate / stream / add_request / step interface.
    `engine_kwargs` go to `LLMEngine.from_pretrained` (max_num_seqs, max_context, kv_cache_dtype ...)."""
    from inferforge.runtime.engine import LLMEngine

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path} does not exist: give a Llama/Mistral/Qwen2 model directory or a causal-LM "
                             "artifact")
    if (path / "manifest.json").is_file():
        import inferforge
        from inferforge.manifest import read_manifest

        kind = read_manifest(path).get("kind")
        engine_only = [flag for key, flag in ENGINE_ONLY_FLAGS.items() if key in engine_kwargs]
        if kind == ONNX_LLM_KIND and engine_only:
            raise UserInputError(f"{path} is an exported ONNX decoder, which runs ONNX Runtime's kernels and "
                                 f"allocates its own memory: {' and '.join(engine_only)} "
                                 f"{'is' if len(engine_only) == 1 else 'are'} for the PyTorch engine; drop "
                                 f"{'it' if len(engine_only) == 1 else 'them'}")
        if kind not in LLM_KINDS:
            raise UserInputError(f"{path} is a {kind} artifact; {command} runs causal-LM artifacts (from "
                                 "`inferforge quantize LLAMA_DIR --config FORMAT` or `inferforge export LLAMA_DIR`) "
                                 "and Llama-family checkpoints")
        return inferforge.load(path, **engine_kwargs)
    return LLMEngine.from_pretrained(path, **engine_kwargs)
