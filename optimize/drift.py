"""Drift: a snapshot of the data an artifact was calibrated on, and a check of new traffic against it.

At quantize time `write_encoder_snapshot` / `write_lm_snapshot` store `drift_snapshot.json` in the
artifact (listed and hashed in the manifest like every file). It holds, for the calibration texts:

- `length_tokens`: input length in tokens (special tokens included, truncated at the model's limit);
- `token_frequency`: the calibration's token ids ranked by count, cut into frequency buckets, with
  cross-fitted expected bucket shares (`drift_stats.token_frequency_feature`), and the [UNK] rate;
- `activations`: per quantized layer input, the min / max seen on calibration (`drift_probe`);
- outputs: for encoders the norm of the mean-pooled embedding before normalization and a seeded random
  projection of the artifact's normalized embeddings to `PROJECTION_DIMS` dims (mean and matrix stored); for
  causal LMs the next-token entropy (nats) at every position.

`check_drift(artifact_dir, texts, thresholds)` runs the artifact over new texts and compares:
PSI per feature, `scipy.stats.ks_2samp` on every numeric feature, the share of activation values
outside the calibrated range per layer, the [UNK] rate, and for encoders whose float source is still
on disk the accuracy gate re-measured on the new texts. It returns a `DriftReport` (`.to_dict()`),
so a recalibration step can call it as the command does.

The decision rule (`DriftThresholds`, every number stated in the report) - a feature drifts when
  PSI >= psi (0.2, Evidently's "significant" band), or
  KS p-value < ks_alpha (0.01) AND KS statistic D >= ks_min_statistic (0.2).
KS alone flags tiny differences on large samples; D is the effect size it must also reach. A layer
drifts when more than max_out_of_range (0.5%) of its activation values fall outside the calibrated
range; the [UNK] rate when it rises by more than max_unknown_rate_increase; the gate when a limit
recorded in the manifest is missed on the new texts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inferforge.errors import UserInputError
from inferforge.optimize.drift_stats import (
    PSI_EPSILON,
    bin_counts,
    ks_test,
    numeric_feature,
    psi,
    token_bucket_counts,
    token_frequency_feature,
)

SNAPSHOT_FILE = "drift_snapshot.json"
SNAPSHOT_FORMAT = "inferforge-drift-snapshot/1"
PROJECTION_DIMS = 4
PROJECTION_SEED = 0
MAX_SNAPSHOT_TEXTS = 1000
CALIBRATION_TEXT_NOTE = (
    "compare held-out traffic, not calibration text. New texts are bucketed by the full calibration token ranking, "
    "so text the calibration saw has no 'unseen' tokens, while the reference shares are cross-fitted (each fold "
    "ranked without its own texts) and do have some; the artifact's own calibration text therefore reports "
    "token_frequency drift. Texts from the same source that calibration did not see are what the reference describes")


@dataclass(frozen=True)
class DriftThresholds:
    """When new traffic counts as drifted (see the module docstring for the rule)."""

    psi: float = 0.2
    psi_moderate: float = 0.1
    ks_alpha: float = 0.01
    ks_min_statistic: float = 0.2
    max_out_of_range: float = 0.005
    max_unknown_rate_increase: float = 0.01
    min_texts: int = 20
    check_gate: bool = True

    def __post_init__(self):
        """Refuse values that would silently disable a check (e.g. a KS D above 1, an out-of-range share of 1)."""
        def refuse(name: str, rule: str) -> None:
            flag = _FLAGS.get(name)
            raise UserInputError(f"drift threshold {name}{f' ({flag})' if flag else ''} must be {rule}, got "
                                 f"{getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                refuse(name, "a finite number")
            return value

        if not number("psi") > 0:
            refuse("psi", "> 0 (PSI is >= 0, so 0 flags every feature)")
        if not 0 < number("psi_moderate") <= self.psi:
            refuse("psi_moderate", f"> 0 and <= psi ({self.psi})")
        if not 0 < number("ks_alpha") < 1:
            refuse("ks_alpha", "between 0 and 1, exclusive (0 would disable the KS test, 1 flag everything)")
        if not 0 < number("ks_min_statistic") <= 1:
            refuse("ks_min_statistic", "in (0, 1]: the KS statistic D is at most 1, so a larger value disables the KS "
                   "test")
        if not 0 <= number("max_out_of_range") < 1:
            refuse("max_out_of_range", "in [0, 1): a share of 1 or more would disable the activation-range check")
        if not 0 <= number("max_unknown_rate_increase") < 1:
            refuse("max_unknown_rate_increase", "in [0, 1): a rise of 1 or more would disable the [UNK] check")
        if isinstance(self.min_texts, bool) or not isinstance(self.min_texts, int) or self.min_texts < 2:
            refuse("min_texts", "an integer >= 2")


_FLAGS = {"psi": "--psi-threshold", "ks_alpha": "--ks-alpha", "ks_min_statistic": "--ks-min-statistic",
          "max_out_of_range": "--max-out-of-range", "max_unknown_rate_increase": "--max-unknown-rate-increase"}


@dataclass
class DriftReport:
    """The comparison of new texts with an artifact's snapshot; `drifted` names what crossed a threshold."""

    artifact: str
    kind: str
    texts: int
    reference_texts: int
    thresholds: dict
    features: list[dict]
    activations: list[dict]
    unknown_token_rate: dict
    gate: dict | None
    drifted: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return bool(self.drifted)

    def to_dict(self) -> dict:
        return {**asdict(self), "drift": self.drift}


# ----------------------------------------------------------------------------------------------
# Snapshot


def _sha256_texts(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def _common(kind: str, texts: Sequence[str], probe, max_length: int, tokenizer, what_activations: str) -> dict:
    tokens = sum(len(t) for t in probe.token_lists)
    return {
        "format": SNAPSHOT_FORMAT, "kind": kind, "texts": len(texts), "texts_sha256": _sha256_texts(texts),
        "max_length": max_length, "psi_bins": "reference quantiles, n // 40 bins (4 to 10)", "psi_epsilon": PSI_EPSILON,
        "features": {"length_tokens": numeric_feature(probe.lengths)},
        "token_frequency": token_frequency_feature(probe.token_lists),
        "unknown_token": {"id": tokenizer.unk_token_id, "rate": probe.unknown_tokens / max(tokens, 1),
                          "tokens": tokens},
        "activations": {"what": what_activations,
                        "layers": {name: {"min": r["min"], "max": r["max"]} for name, r in probe.layers.items()}},
    }


def build_encoder_snapshot(onnx_path, tokenizer, texts: Sequence[str], *, max_length: int,
                           range_texts: Sequence[str] | None = None) -> dict:
    """The snapshot of an ONNX sentence encoder: the distributions over `texts` (the calibration
    sentences as written), the activation ranges over `range_texts` (every calibration text,
    derived short queries and long passages included; default `texts`)."""
    from inferforge.optimize.drift_probe import probe_onnx_encoder

    texts = list(texts)[:MAX_SNAPSHOT_TEXTS]
    probe = probe_onnx_encoder(onnx_path, tokenizer, texts, max_length=max_length)
    if range_texts is not None:
        probe.layers = probe_onnx_encoder(onnx_path, tokenizer, list(range_texts), max_length=max_length).layers
    snapshot = _common("sentence-encoder", texts, probe, max_length, tokenizer,
                       "inputs of the model's quantized MatMuls (DynamicQuantizeLinear inputs: per-tensor scales "
                       "computed at run time), min/max over real tokens of the calibration texts")
    snapshot["range_texts"] = len(range_texts) if range_texts is not None else len(texts)
    emb = probe.embeddings.astype(np.float64)
    mean = emb.mean(axis=0)
    # A fixed seeded random projection, not PCA: PCA fitted on 160 reference points in 384 dims
    # captures variance specific to those points, and held-out text from the same source then looks
    # narrower along them (measured: 24% of held-out samples flagged on PCA component 3).
    gaussian = np.random.default_rng(PROJECTION_SEED).standard_normal((emb.shape[1], PROJECTION_DIMS))
    components = np.linalg.qr(gaussian)[0].T                  # [dims, hidden], orthonormal rows
    projected = (emb - mean) @ components.T
    snapshot["projection"] = {"method": f"seeded Gaussian random projection (seed {PROJECTION_SEED}, QR-orthonormalized)"
                                        f" of the artifact's normalized embeddings, centred, {PROJECTION_DIMS} dims",
                              "mean": mean.round(7).tolist(), "components": components.round(7).tolist()}
    snapshot["features"]["embedding_norm"] = numeric_feature(probe.values["embedding_norm"])
    for k in range(len(components)):
        snapshot["features"][f"projection_{k + 1}"] = numeric_feature(projected[:, k])
    return snapshot


def build_lm_snapshot(model, tokenizer, texts: Sequence[str], *, max_length: int, layer_names: Sequence[str]) -> dict:
    """The snapshot of a (quantized) causal LM in PyTorch over calibration `texts`."""
    from inferforge.optimize.drift_probe import probe_causal_lm

    texts = list(texts)[:MAX_SNAPSHOT_TEXTS]
    probe = probe_causal_lm(model, tokenizer, texts, max_length=max_length, layer_names=layer_names)
    snapshot = _common("causal-lm", texts, probe, max_length, tokenizer,
                       "inputs of the linear layers (forward pre-hooks), min/max over every token")
    snapshot["layer_names"] = list(layer_names)
    snapshot["features"]["next_token_entropy"] = numeric_feature(probe.values["next_token_entropy"])
    return snapshot


def write_snapshot(directory: Path, snapshot: dict) -> dict:
    """Write `drift_snapshot.json` into the (staging) artifact; returns the manifest's record of it."""
    from inferforge.fileio import atomic_write_text

    atomic_write_text(Path(directory) / SNAPSHOT_FILE, json.dumps(snapshot, separators=(",", ":")) + "\n")
    return {"file": SNAPSHOT_FILE, "texts": snapshot["texts"], "texts_sha256": snapshot["texts_sha256"],
            "features": sorted(snapshot["features"]), "layers": len(snapshot["activations"]["layers"])}


def read_snapshot(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / SNAPSHOT_FILE
    if not path.is_file():
        raise UserInputError(f"{artifact_dir}: no {SNAPSHOT_FILE} (an artifact made before drift snapshots); re-run "
                             "`inferforge quantize` (or the recipe) to write one")
    snapshot = json.loads(path.read_text(encoding="utf-8"))
    if snapshot.get("format") != SNAPSHOT_FORMAT:
        raise UserInputError(f"{path}: not an {SNAPSHOT_FORMAT} file; re-run `inferforge quantize` to write one")
    return snapshot


# ----------------------------------------------------------------------------------------------
# Check


def resolve_artifact(ref: str | Path) -> Path:
    """An artifact directory from a path or a registry reference `NAME@ALIAS` / `NAME@VERSION`."""
    from inferforge.registry_refs import resolve_artifact_arg

    path = resolve_artifact_arg(ref)
    if not path.exists():
        raise UserInputError(f"{ref}: no such artifact directory; give the directory a quantize run wrote, or "
                             "NAME@ALIAS of a registered one")
    return path


def _band(value: float, t: DriftThresholds) -> str:
    return "significant" if value >= t.psi else "moderate" if value >= t.psi_moderate else "none"


def compare_numeric(name: str, ref: dict, new_values: Sequence[float], t: DriftThresholds) -> dict:
    new_counts = bin_counts(new_values, ref["edges"])
    value = psi(ref["counts"], new_counts)
    d, p = ks_test(ref["values"], new_values)
    ks_flag = bool(p < t.ks_alpha and d >= t.ks_min_statistic)
    reasons = ([f"PSI {value:.3f} >= {t.psi}"] if value >= t.psi else []) + (
        [f"KS D {d:.3f} >= {t.ks_min_statistic} with p {p:.2g} < {t.ks_alpha}"] if ks_flag else [])
    return {"name": name, "psi": value, "psi_band": _band(value, t), "ks_statistic": d, "ks_pvalue": p, "ks_drift": ks_flag,
            "reference_mean": ref["mean"], "new_mean": float(np.mean(new_values)), "edges": ref["edges"],
            "reference_counts": ref["counts"], "new_counts": new_counts, "new_values": [float(v) for v in new_values],
            "reference_values": ref["values"], "drift": bool(reasons), "reason": "; ".join(reasons)}


def _gate(manifest: dict, artifact_dir: Path, texts: Sequence[str], embeddings_of) -> dict:
    """The encoder's cosine gate re-measured on `texts` against its float source, when that is on disk."""
    limits = {c["name"].split(" (")[0]: c["limit"] for c in manifest.get("checks", [])
              if c.get("kind") == "gate" and c["name"].split(" (")[0] in ("min cosine", "mean cosine")}
    source = Path(manifest.get("source", {}).get("path") or "")
    if not limits or not (source / "config.json").is_file():
        return {"available": False, "note": f"not re-measured: the float source ({source}) is not on disk"
                if limits else "not re-measured: the manifest records no cosine gate"}
    from inferforge.encoder import TorchEncoder
    from inferforge.optimize.validate import cosine_rows

    max_length = manifest["runtime"]["max_length"]
    reference = TorchEncoder(source, max_length=max_length)(list(texts))
    cos = cosine_rows(reference, embeddings_of(list(texts)))
    measured = {"min cosine": float(cos.min()), "mean cosine": float(cos.mean())}
    checks = [{"name": f"{k} (new texts)", "measured": measured[k], "op": ">=", "limit": v, "passed": measured[k] >= v}
              for k, v in limits.items()]
    return {"available": True, "reference": str(source), "checks": checks, "passed": all(c["passed"] for c in checks)}


def unknown_rate(reference: float, new: float, t: DriftThresholds) -> dict:
    """The [UNK] rate record: drift when it rises by more than `max_unknown_rate_increase` (a fall is not drift)."""
    return {"reference": reference, "new": new, "drift": new - reference > t.max_unknown_rate_increase}


def drifted_items(features: list[dict], activations: list[dict], unk: dict, gate: dict | None,
                  t: DriftThresholds) -> list[dict]:
    """What drifted, with the reason: features, layers, the [UNK] rate, and every gate missed on the new texts."""
    drifted = [{"what": f["name"], "reason": f["reason"]} for f in features if f["drift"]]
    drifted += [{"what": f"activations {a['layer']}", "reason": f"{a['outside_share']:.2%} of values outside the "
                 f"calibrated range [{a['calibrated_min']:.3g}, {a['calibrated_max']:.3g}] > {t.max_out_of_range:.2%}"}
                for a in activations if a["drift"]]
    if unk["drift"]:
        drifted.append({"what": "unknown_token_rate", "reason": f"[UNK] rate {unk['new']:.2%} vs {unk['reference']:.2%} "
                        f"in calibration (> +{t.max_unknown_rate_increase:.2%})"})
    if gate and gate.get("available") and not gate["passed"]:
        drifted += [{"what": f"gate {c['name']}", "reason": f"measured {c['measured']:.4f}, required >= {c['limit']}"}
                    for c in gate["checks"] if not c["passed"]]
    return drifted


def check_drift(artifact_dir: str | Path, texts: Sequence[str], thresholds: DriftThresholds | None = None) -> DriftReport:
    """Compare `texts` (new traffic) with the artifact's snapshot; see the module docstring."""
    from inferforge.manifest import verify_artifact

    t = thresholds or DriftThresholds()
    artifact_dir = Path(artifact_dir)
    texts = [s for s in texts if s.strip()]
    if len(texts) < t.min_texts:
        raise UserInputError(f"{len(texts)} texts: the drift check needs at least {t.min_texts} non-empty texts")
    manifest = verify_artifact(artifact_dir)
    snapshot = read_snapshot(artifact_dir)
    ranges = {k: (v["min"], v["max"]) for k, v in snapshot["activations"]["layers"].items()}
    gate = None
    if snapshot["kind"] == "sentence-encoder":
        from transformers import AutoTokenizer

        from inferforge.encoder import OnnxEncoder
        from inferforge.optimize.drift_probe import probe_onnx_encoder

        tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir))
        model_path = artifact_dir / manifest["runtime"]["model"]
        probe = probe_onnx_encoder(model_path, tokenizer, texts, max_length=snapshot["max_length"], ranges=ranges)
        proj = snapshot["projection"]
        projected = (probe.embeddings.astype(np.float64) - np.asarray(proj["mean"])) @ np.asarray(proj["components"]).T
        for k in range(projected.shape[1]):
            probe.values[f"projection_{k + 1}"] = projected[:, k].tolist()
        if t.check_gate:
            from inferforge.ort_config import read_session_options

            encoder = OnnxEncoder(model_path, tokenizer, max_length=snapshot["max_length"],
                                  session_options=read_session_options(artifact_dir, manifest))
            gate = _gate(manifest, artifact_dir, texts, encoder)
    else:
        from transformers import AutoTokenizer

        from inferforge.optimize.drift_probe import probe_causal_lm
        from inferforge.optimize.llm_quantize import load_as_transformers

        tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir))
        probe = probe_causal_lm(load_as_transformers(artifact_dir), tokenizer, texts,
                                max_length=snapshot["max_length"], layer_names=snapshot["layer_names"], ranges=ranges)
    probe.values["length_tokens"] = probe.lengths
    features = [compare_numeric(name, ref, probe.values[name], t) for name, ref in snapshot["features"].items()]
    tf = snapshot["token_frequency"]
    new_counts = token_bucket_counts(probe.token_lists, tf["ranked_ids"], tf["cuts"])
    value = psi(tf["counts"], new_counts)
    features.append({"name": "token_frequency", "psi": value, "psi_band": _band(value, t), "labels": tf["labels"],
                     "reference_counts": tf["counts"], "new_counts": new_counts, "drift": value >= t.psi,
                     "reason": f"PSI {value:.3f} >= {t.psi}" if value >= t.psi else ""})
    tokens = sum(len(x) for x in probe.token_lists)
    unk = unknown_rate(snapshot["unknown_token"]["rate"], probe.unknown_tokens / max(tokens, 1), t)
    activations = []
    for name, rec in probe.layers.items():
        lo, hi = ranges[name]
        share = rec["outside"] / max(rec["total"], 1)
        activations.append({"layer": name, "calibrated_min": lo, "calibrated_max": hi, "new_min": rec["min"],
                            "new_max": rec["max"], "outside_share": share, "drift": share > t.max_out_of_range})
    drifted = drifted_items(features, activations, unk, gate, t)
    notes = [] if len(texts) >= 100 else [f"only {len(texts)} texts: KS and PSI are noisy below ~100"]
    if _sha256_texts(texts[:MAX_SNAPSHOT_TEXTS]) == snapshot["texts_sha256"]:
        notes.append("these are the artifact's own calibration texts: " + CALIBRATION_TEXT_NOTE)
    elif any(f["name"] == "token_frequency" and f["drift"] for f in features):
        notes.append("token_frequency: " + CALIBRATION_TEXT_NOTE)
    return DriftReport(artifact=str(artifact_dir), kind=snapshot["kind"], texts=len(texts),
                       reference_texts=snapshot["texts"], thresholds={**asdict(t), "psi_epsilon": PSI_EPSILON},
                       features=features, activations=activations, unknown_token_rate=unk, gate=gate,
                       drifted=drifted, notes=notes)
