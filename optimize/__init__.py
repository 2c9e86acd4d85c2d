"""Optimization steps: ONNX export, int8 quantization and validation against the source model.

Each step takes plain objects (a model directory, an ONNX path, sentences) and returns a path or a
report; the pipeline in `inferforge.pipeline` strings them together from a recipe.
"""

from inferforge.optimize.export import export_onnx
from inferforge.optimize.onnx_quantize import quantize_onnx_int8
from inferforge.optimize.quantize import (
           FP8,
           W8A8,
           Int4WeightOnly,
           Int8WeightOnly,
           QuantizeReport,
           quantize,
           sqnr_db,
)
from inferforge.optimize.validate import EmbeddingReport, compare_embeddings

__all__ = ["export_onnx", "quantize_onnx_int8", "compare_embeddings", "EmbeddingReport", "quantize", "Int8WeightOnly",
           "Int4WeightOnly", "W8A8", "FP8", "QuantizeReport", "sqnr_db"]
