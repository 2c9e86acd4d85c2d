"""Export a Llama / Mistral / Qwen2 checkpoint to one ONNX decoder with past key/values.

The graph is the one optimum-onnx writes for `text-generation-with-past`:
inputs `input_ids` and `position_ids` int64 `[batch, sequence]`, `attention_mask` int64
`[batch, past_sequence + sequence]`, and `past_key_values.{i}.key|value` float
`[batch, kv_heads, past_sequence, head_dim]` for every layer; outputs `logits`
`[batch, sequence, vocab]` and `present.{i}.key|value` `[batch, kv_heads, past_sequence + sequence, head_dim]`.
Batch, sequence and past length are dynamic axes. A first step passes past tensors with
`past_sequence = 0`. MatMul nodes keep the module path of their layer in their name
(`/model/layers.0/self_attn/q_proj/MatMul`), which the quantized export relies on.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

DECODER_TASK = "text-generation-with-past"


def export_decoder_onnx(model_dir: str | Path, out_dir: str | Path, *, opset: int = 18) -> Path:
    """Export the checkpoint `model_dir` with optimum-onnx to `out_dir/model.onnx` (plus
    `model.onnx_data` when the weights exceed ONNX's 2 GB protobuf limit); returns the model path.
    Config, generation config and tokenizer files are written beside it."""
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    logging.getLogger("optimum").setLevel(logging.ERROR)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # Tracer warnings about Python control flow; the graph is checked against PyTorch after.
            warnings.simplefilter("ignore")
            main_export(str(model_dir), output=str(out_dir), task=DECODER_TASK, opset=opset,
                        library_name="transformers", device="cpu", do_validation=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    onnx_path = out_dir / "model.onnx"
    if not onnx_path.is_file():
        raise RuntimeError(f"optimum-onnx wrote no model.onnx under {out_dir}")
    return onnx_path
