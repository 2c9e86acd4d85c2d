"""Sentence encoders: sentences in, L2-normalized mean-pooled embeddings out.

The same call signature whatever runs underneath, so the optimized artifact is a drop-in replacement
for the source model: `encoder(["a sentence", ...]) -> np.ndarray [n, hidden] float32`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Average the token states over real (unmasked) tokens, then L2-normalize. hidden: [b, s, h]."""
    mask = attention_mask[..., None].astype(np.float32)
    summed = (hidden.astype(np.float32) * mask).sum(axis=1)
    pooled = summed / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)


class SentenceEncoder:
    """Base: tokenization and pooling; subclasses run the transformer on the token ids."""

    def __init__(self, tokenizer, *, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, sentences: Sequence[str], *, pad_to: int | None = None) -> dict[str, np.ndarray]:
        padding = "max_length" if pad_to else True
        batch = self.tokenizer(list(sentences), padding=padding, truncation=True,
                               max_length=pad_to or self.max_length, return_tensors="np")
        return {k: v.astype(np.int64) for k, v in batch.items()}

    def hidden_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, sentences: Sequence[str] | str, *, batch_size: int = 32) -> np.ndarray:
        if isinstance(sentences, str):
            sentences = [sentences]
        if not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences must be a string or a list of strings")
        if len(sentences) == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        # Batch sentences of similar length together (longest first): less padding means less work,
        # and for int8 models with per-tensor activation scales, padding tokens no longer widen the range.
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = None
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenize([sentences[i] for i in idx])
            pooled = mean_pool(self.hidden_states(batch), batch["attention_mask"])
            if out is None:
                out = np.empty((len(sentences), pooled.shape[-1]), np.float32)
            out[idx] = pooled
        return out

    encode = __call__

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError


class TorchEncoder(SentenceEncoder):
    """The source model in PyTorch (the reference every optimized model is validated against)."""

    def __init__(self, model_dir: str | Path, *, max_length: int = 128, threads: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        super().__init__(AutoTokenizer.from_pretrained(model_dir), max_length=max_length)
        self.model = AutoModel.from_pretrained(model_dir).float().eval()
        self.threads = threads
        accepted = inspect.signature(self.model.forward).parameters
        self._input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def hidden_states(self, batch):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(batch[k]) for k in self._input_names if k in batch})
        return out.last_hidden_state.numpy()


# Graph fusions left off when an artifact does not say otherwise (artifacts written before the
# shipped graph carried its own fix, `inferforge.optimize.ort_fusions`): on the int8 models this
# fusion's kernel is slower than the plain Add and LayerNormalization it replaces (measured on 2
# AVX-512 VNNI cores, batch 8 x 128 tokens: int8 MiniLM 42.2 -> 39.7 ms), and it makes no difference
# to the fp32 models (77.8 vs 76.4 ms).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)

# How inferforge opens a model when nothing else is said: all graph optimizations but
# DISABLED_OPTIMIZERS, and intra-op threads that do not spin-wait between calls (spinning threads of
# one session steal the cores from whatever runs next: another session, PyTorch, the tokenizer;
# measured on 2 cores, two sessions run alternately took 1.5-1.9x longer each with spinning on).
DEFAULT_SESSION_OPTIONS = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "disabled_optimizers": list(DISABLED_OPTIMIZERS),
    "config_entries": {"session.intra_op.allow_spinning": "0"},
}


def ort_session(onnx_path: str | Path, *, threads: int | None = None, session_options: dict | None = None):
    """A CPU ONNX Runtime session opened with `session_options` (default `DEFAULT_SESSION_OPTIONS`).

    `session_options` keys (all optional; what an artifact's `ort_config.json` records, see
    `inferforge.ort_config`): `graph_optimization_level` (a `GraphOptimizationLevel` name, default
    ORT_ENABLE_ALL), `disabled_optimizers` (graph transformer names), `config_entries` (session
    config key -> string value).
    """
    import onnxruntime as ort

    options = DEFAULT_SESSION_OPTIONS if session_options is None else session_options
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            options.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    for key, value in options.get("config_entries", {}).items():
        opts.add_session_config_entry(key, str(value))
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(options.get("disabled_optimizers", [])))


class OnnxEncoder(SentenceEncoder):
    """An exported (and possibly quantized) ONNX model run by ONNX Runtime."""

    def __init__(self, onnx_path: str | Path, tokenizer, *, max_length: int = 128, threads: int | None = None,
                 hidden_size: int | None = None, session_options: dict | None = None):
        super().__init__(tokenizer, max_length=max_length)
        self.onnx_path = Path(onnx_path)
        self.session = ort_session(onnx_path, threads=threads, session_options=session_options)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._hidden_size = hidden_size or self.session.get_outputs()[0].shape[-1]

    @property
    def hidden_size(self) -> int:
        if not isinstance(self._hidden_size, int):
            raise ValueError(f"{self.onnx_path}: the output's hidden size is not static ({self._hidden_size!r})")
        return self._hidden_size

    def hidden_states(self, batch):
        return self.session.run(None, {n: batch[n] for n in self.input_names})[0]
