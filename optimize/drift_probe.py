"""One pass of a model over texts, collecting what the drift snapshot and check compare.

Encoders (ONNX): input lengths and token ids, the [UNK] count, the mean-pooled embedding before
normalization (its norm) and after, and per quantized-MatMul activation the min / max over real
(non-padding) tokens. Which activations: the inputs of `DynamicQuantizeLinear` nodes (the ONNX
dynamic int8 path quantizes each MatMul input at run time with one per-tensor scale: the range
recorded is the range that scale had to cover on calibration), else the non-constant inputs of
`QuantizeLinear` nodes (static QDQ), else the inputs of MatMuls with a constant weight (fp32).
They are read as extra graph outputs of the artifact's own model in ONNX Runtime.

Causal LMs (PyTorch): lengths, token ids, [UNK] count, next-token entropy in nats at every position,
and per linear layer the min / max of its input, through forward pre-hooks.

With `ranges` ({layer: (min, max)}), each layer also counts its values outside [min, max]: the
values a static int8 scale fixed on calibration would clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ProbeResult:
    lengths: list[int] = field(default_factory=list)         # tokens per text, special tokens included
    token_lists: list[list[int]] = field(default_factory=list)   # ids per text, special tokens left out
    unknown_tokens: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)  # per-text or per-token outputs
    embeddings: np.ndarray | None = None                     # [n, hidden] L2-normalized (encoders)
    layers: dict[str, dict] = field(default_factory=dict)    # name -> min, max[, outside, total]

    def observe(self, name: str, values: np.ndarray, ranges: dict | None) -> None:
        if values.size == 0:
            return
        rec = self.layers.setdefault(name, {"min": float("inf"), "max": float("-inf"), "outside": 0, "total": 0})
        rec["min"] = min(rec["min"], float(values.min()))
        rec["max"] = max(rec["max"], float(values.max()))
        rec["total"] += int(values.size)
        if ranges and name in ranges:
            lo, hi = ranges[name]
            rec["outside"] += int(np.count_nonzero((values < lo) | (values > hi)))


def _tokens(tokenizer, texts: Sequence[str], max_length: int, out: ProbeResult) -> None:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    out.lengths = [len(ids) for ids in enc["input_ids"]]
    special = set(tokenizer.all_special_ids)
    out.token_lists = [[int(t) for t in ids if t not in special] for ids in enc["input_ids"]]
    unk = tokenizer.unk_token_id
    out.unknown_tokens = sum(ids.count(unk) for ids in out.token_lists) if unk is not None else 0


def quantized_activation_inputs(model) -> list[str]:
    """The activation tensors the model quantizes (see the module docstring), in graph order."""
    inits = {i.name for i in model.graph.initializer}
    for op in ("DynamicQuantizeLinear", "QuantizeLinear"):
        names = [n.input[0] for n in model.graph.node if n.op_type == op and n.input[0] not in inits]
        if names:
            return list(dict.fromkeys(names))
    return list(dict.fromkeys(n.input[0] for n in model.graph.node
                              if n.op_type == "MatMul" and n.input[1] in inits and n.input[0] not in inits))


def probe_onnx_encoder(onnx_path, tokenizer, texts: Sequence[str], *, max_length: int, ranges: dict | None = None,
                       batch_size: int = 16) -> ProbeResult:
    """Run the ONNX encoder over `texts` (batches of similar length) and collect the features."""
    import onnx

    from inferforge.optimize.onnx_quantize import ort_session_from_bytes

    out = ProbeResult()
    _tokens(tokenizer, texts, max_length, out)
    model = onnx.load(str(onnx_path))
    tensors = quantized_activation_inputs(model)
    for name in tensors:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session_from_bytes(model.SerializeToString())
    input_names = [i.name for i in session.get_inputs()]
    hidden_name = session.get_outputs()[0].name
    order = sorted(range(len(texts)), key=lambda i: -out.lengths[i])
    norms = np.zeros(len(texts))
    embeddings = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="np")
        batch = {k: v.astype(np.int64) for k, v in batch.items()}
        results = session.run([hidden_name, *tensors], {n: batch[n] for n in input_names})
        mask = batch["attention_mask"].astype(bool)
        for name, value in zip(tensors, results[1:]):
            real = value[mask] if value.shape[:2] == mask.shape else value
            out.observe(name, real, ranges)
        m = mask[..., None].astype(np.float32)
        pooled = (results[0] * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        n = np.linalg.norm(pooled, axis=-1)
        if embeddings is None:
            embeddings = np.zeros((len(texts), pooled.shape[-1]), np.float32)
        norms[idx] = n
        embeddings[idx] = pooled / np.clip(n[:, None], 1e-12, None)
    out.values["embedding_norm"] = norms.tolist()
    out.embeddings = embeddings
    return out


def probe_causal_lm(model, tokenizer, texts: Sequence[str], *, max_length: int, layer_names: Sequence[str],
                    ranges: dict | None = None) -> ProbeResult:
    """Run the causal LM on each text (one at a time, no padding) and collect the features."""
    import torch

    out = ProbeResult()
    _tokens(tokenizer, texts, max_length, out)
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda mod, args, name=name: out.observe(name, args[0].detach().float().numpy(), ranges))
        for name in layer_names if name in modules]
    entropies = []
    try:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        with torch.inference_mode():
            for ids in enc["input_ids"]:
                if not ids:
                    continue
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                entropies.extend((-(logp.exp() * logp).sum(-1)).tolist())
    finally:
        for h in hooks:
            h.remove()
    out.values["next_token_entropy"] = entropies
    return out
