"""Export a Hugging Face encoder to ONNX with optimum-onnx, then check ONNX Runtime against PyTorch."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from inferforge.errors import GateFailed

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "config.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, opset: int = 17) -> Path:
    """Export `model_dir` (task feature-extraction) to `out_dir/model.onnx`; returns that path.

    Inputs `input_ids`, `attention_mask` (and `token_type_ids` where the model has them), int64
    `[batch, sequence]` with both axes dynamic; output `last_hidden_state` `[batch, sequence, hidden]`.
    """
    from optimum.exporters.onnx import main_export

    out_dir = Path(out_dir)
    logging.getLogger("optimum").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # optimum passes arguments transformers calls deprecated
    with warnings.catch_warnings():
        # The TorchScript tracer warns about Python control flow in every transformers model; the
        # export is checked numerically against PyTorch right after, which is what matters.
        warnings.simplefilter("ignore")
        main_export(str(model_dir), output=str(out_dir), task="feature-extraction", opset=opset,
                    library_name="transformers", device="cpu", do_validation=False)
    hf_logging.set_verbosity(verbosity)
    onnx_path = out_dir / "model.onnx"
    if not onnx_path.is_file():
        raise RuntimeError(f"optimum-onnx wrote no model.onnx under {out_dir}")
    return onnx_path


def copy_tokenizer(model_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer and config files the runtime needs; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def check_export(reference, exported, sentences, *, atol: float) -> dict:
    """Compare the token states of the ONNX export with PyTorch's; raise GateFailed beyond `atol`.

    `reference` and `exported` are `SentenceEncoder`s. Returns the max and mean absolute difference.
    """
    max_diff, sum_diff, count = 0.0, 0.0, 0
    for i in range(0, len(sentences), 16):
        batch = reference.tokenize(sentences[i:i + 16])
        want = reference.hidden_states(batch)
        got = exported.hidden_states(batch)
        mask = batch["attention_mask"].astype(bool)
        diff = np.abs(want[mask] - got[mask])
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        count += diff.size
    result = {"max_abs_diff": max_diff, "mean_abs_diff": sum_diff / max(count, 1), "atol": atol,
              "sentences": len(sentences)}
    if max_diff > atol:
        raise GateFailed(f"export: ONNX Runtime's output differs from PyTorch by up to {max_diff:.2e} "
                         f"(tolerance {atol:.0e}); the export is not faithful. Try another opset "
                         "(steps[0].export.opset) or report the model.",
                         check={"name": "ONNX Runtime vs PyTorch max abs diff (export)", "kind": "gate",
                                "measured": max_diff, "op": "<=", "limit": atol})
    return result
