"""Check an exported decoder against its PyTorch model; a mismatch is an error (`GateFailed`), not a warning.

Two checks on fresh prompts of random token ids (seeded), each prompt length alone (batch 1) and all
of them together (one batch, left-padded):

1. One forward pass from an empty past: `logits` and every `present.{i}.key|value` at the real
   (non-padding) positions against the PyTorch model's logits and past key/values. The limit is
   relative to the scale of what is compared, `rtol * max(1, max |reference|)`: rtol 1e-4 for an
   fp32 graph (measured: about 5e-7 of it), 1e-2 for an fp16 one (weights and activations round to 11
   bits; measured about 1e-3 on the tiny test models, deeper models add up more), or an absolute `logits_atol`
   when the caller states one (a quantized graph against its quantized reference).
2. Greedy generation of `greedy_steps` tokens through the past-key-values path (`OnnxDecoder`, which
   feeds `present.*` back as `past_key_values.*`) against a greedy loop of the PyTorch model with its
   own cache; with `exact_tokens` the token ids must be identical, else their agreement is recorded.

The PyTorch model is any transformers causal LM taking `input_ids`, `attention_mask`, `position_ids`,
`past_key_values`, `use_cache`; it runs on the CPU in its own dtype.
"""

from __future__ import annotations

import torch

from inferforge.errors import GateFailed
from inferforge.optimize.onnx_decoder import OnnxDecoder, left_pad

FP32_RTOL = 1e-4
FP16_RTOL = 1e-2


def _reference_past(cache) -> list[torch.Tensor]:
    """A transformers cache (or legacy tuple) as [key0, value0, key1, value1, ...]."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    return [t for key_value in cache for t in key_value[:2]]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def torch_greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy token ids of the PyTorch `model` for left-padded `prompts`, reusing its cache each step."""
    ids, mask, positions = left_pad(prompts)
    tokens = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for step in range(steps):
            next_ids = out.logits[:, -1].float().argmax(-1)
            tokens.append(next_ids)
            if step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], 1)
            out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, 1).tolist()


def _random_prompts(lengths, vocab: int, generator: torch.Generator) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def _fail(message: str, check: dict) -> GateFailed:
    return GateFailed(message, check={"name": "onnx-vs-pytorch", "kind": "gate", "passed": False, **check})


def validate_decoder(onnx_path, reference, spec, *, fp16: bool = False, logits_atol: float | None = None,
                     exact_tokens: bool = True, greedy_steps: int = 16, lengths: tuple[int, ...] = (1, 7, 33),
                     seed: int = 0, provider: str | None = None,
                     session_config: dict[str, str] | None = None) -> dict:
    """Compare the graph at `onnx_path` with the PyTorch `reference` (see the module docstring).

    `spec` is the model's `LlamaSpec`; `session_config`: ONNX Runtime session config entries the graph needs. Returns the numbers: per case the largest absolute difference
    of the logits and of the present key/values with their limits, and the greedy comparison.
    Raises `GateFailed` naming the output, the case and the largest difference on a mismatch."""
    reference = reference.eval()
    decoder = OnnxDecoder(onnx_path, spec, max_num_seqs=len(lengths), provider=provider,
                          session_config=session_config)
    session = decoder.model
    rtol = FP16_RTOL if fp16 else FP32_RTOL
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch_lengths in [(n,) for n in lengths] + [tuple(lengths)]:
        prompts = _random_prompts(batch_lengths, spec.vocab_size, generator)
        ids, mask, positions = left_pad(prompts)
        with torch.no_grad():
            ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, present = session.run(ids.to(session.device), mask.to(session.device),
                                      positions.to(session.device), session.empty_past(len(prompts)))
        real = mask.bool()
        where = f"batch {len(prompts)}, prompt lengths {list(batch_lengths)}"
        case = {"batch": len(prompts), "lengths": list(batch_lengths)}
        compared = [("logits", logits.cpu()[real], ref.logits[real], logits_atol)]
        compared += [(name, p.cpu().transpose(1, 2)[real], r.transpose(1, 2)[real], None)
                     for name, p, r in zip(session.present_names, present, _reference_past(ref.past_key_values))]
        worst_present = 0.0
        for name, got, want, atol in compared:
            if got.shape != want.shape:
                raise _fail(f"ONNX Runtime vs PyTorch: {name} has shape {tuple(got.shape)}, PyTorch "
                            f"{tuple(want.shape)} ({where})", {"output": name, **case})
            diff = _max_diff(got, want)
            limit = atol if atol is not None else rtol * max(1.0, float(want.float().abs().max()))
            if not diff <= limit:   # NaN fails too
                raise _fail(f"ONNX Runtime vs PyTorch: {name} differs by {diff:.3g} (limit {limit:.3g}) at {where}; "
                            "the exported graph does not compute what the model computes",
                            {"output": name, "measured": diff, "op": "<=", "limit": limit, **case})
            if name == "logits":
                case.update(logits_max_abs_diff=diff, logits_limit=limit)
            else:
                worst_present = max(worst_present, diff)
        case["present_max_abs_diff"] = worst_present
        cases.append(case)

    greedy = []
    for batch_lengths in [(lengths[len(lengths) // 2],), tuple(lengths)]:
        prompts = _random_prompts(batch_lengths, spec.vocab_size, generator)
        onnx_tokens = decoder.generate(prompts, max_new_tokens=greedy_steps, stop_token_ids=[])
        torch_tokens = torch_greedy(reference, prompts, greedy_steps)
        same = sum(a == b for o, t in zip(onnx_tokens, torch_tokens) for a, b in zip(o, t))
        total = len(prompts) * greedy_steps
        result = {"batch": len(prompts), "lengths": list(batch_lengths), "steps": greedy_steps,
                  "identical": onnx_tokens == torch_tokens, "agreement": same / total}
        greedy.append(result)
        if exact_tokens and onnx_tokens != torch_tokens:
            row, step = next((i, s) for i, (o, t) in enumerate(zip(onnx_tokens, torch_tokens))
                             for s, (a, b) in enumerate(zip(o, t)) if a != b)
            raise _fail(f"greedy tokens differ from PyTorch's at step {step} of prompt {row} (batch {len(prompts)}, "
                        f"prompt lengths {list(batch_lengths)}, through past_key_values): ONNX "
                        f"{onnx_tokens[row][step]} vs PyTorch {torch_tokens[row][step]}; largest logits difference "
                        f"in the forward checks {max(c['logits_max_abs_diff'] for c in cases):.3g}",
                        {"output": "greedy tokens", "measured": same / total, "op": "==", "limit": 1.0, **result})
    return {"provider": session.provider, "dtype": "fp16" if fp16 else "fp32", "rtol": None if logits_atol else rtol,
            "logits_atol": logits_atol, "seed": seed, "cases": cases, "greedy": greedy,
            "greedy_steps": greedy_steps, "identical": all(g["identical"] for g in greedy)}
