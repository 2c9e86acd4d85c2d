"""Drift: PSI and KS against numpy / scipy, the snapshot in the demo artifact, drift on real text, bad
inputs, and the causal-LM snapshot (next-token entropy) on a tiny random Llama."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from inferforge.data import read_sentences
from inferforge.optimize.drift_stats import (
    PSI_EPSILON,
    bin_counts,
    ks_test,
    numeric_feature,
    psi,
    quantile_edges,
    token_bucket_counts,
    token_ranking,
)
from tests.conftest import run_cli
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer

# Quantized layers run their PyTorch references here, not the Triton interpreter (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quantized_layers_as_on_cpu")

DATA = Path(__file__).parent / "data"


# ----------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("shift", [0.0, 0.3, 1.5])
def test_psi_matches_a_direct_numpy_computation(shift):
    rng = np.random.default_rng(0)
    reference, new = rng.normal(size=500), rng.normal(loc=shift, size=300)
    edges = quantile_edges(reference, 10)
    assert len(edges) == 9
    # Direct: numpy's histogram over the same bins (open outer bins), shares clipped at epsilon.
    bins = np.concatenate([[-np.inf], edges, [np.inf]])
    e = np.histogram(reference, bins)[0] / len(reference)
    a = np.histogram(new, bins)[0] / len(new)
    e, a = np.clip(e, PSI_EPSILON, None), np.clip(a, PSI_EPSILON, None)
    expected = float(np.sum((a - e) * np.log(a / e)))
    got = psi(bin_counts(reference, edges), bin_counts(new, edges))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert (got < 0.1) if shift == 0 else (got > 0.2) if shift > 1 else True


def test_psi_of_an_empty_bin_is_large_but_finite_and_bad_histograms_are_refused():
    value = psi([50, 50], [100, 0])
    assert np.isfinite(value) and value > 1
    assert psi([10, 20, 30], [10, 20, 30]) == 0.0
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_psi_clips_an_empty_bin_at_1e_minus_4():
    # Reference shares (0.5, 0.5, 0) -> (0.5, 0.5, 1e-4); new shares (0.25, 0.25, 0.5). By hand:
    # 2 * (0.25 - 0.5) * ln(0.25 / 0.5) + (0.5 - 1e-4) * ln(0.5 / 1e-4) = 0.346574 + 4.257744
    assert psi([50, 50, 0], [25, 25, 50]) == pytest.approx(4.60431846666895, rel=1e-12)
    # ... and the other way round: the new sample's empty bin is clipped the same way.
    assert psi([25, 25, 50], [50, 50, 0]) == pytest.approx(4.60431846666895, rel=1e-12)


def _thresholds(**kw):
    from inferforge.optimize.drift import DriftThresholds

    return DriftThresholds(**{"psi": 50.0, "psi_moderate": 40.0, **kw})   # PSI out of the way: KS alone decides


def test_ks_flags_a_feature_only_when_p_is_small_and_d_is_large():
    from inferforge.optimize.drift import compare_numeric

    rng = np.random.default_rng(3)
    ref = numeric_feature(rng.normal(size=4000))
    # A small shift on a large sample: p tiny, D about 0.05 -> not drift at D >= 0.2, drift at D >= 0.03.
    small_shift = rng.normal(0.12, 1, size=4000)
    f = compare_numeric("x", ref, small_shift, _thresholds())
    assert f["ks_pvalue"] < 0.01 and f["ks_statistic"] < 0.2 and not f["ks_drift"] and not f["drift"]
    f = compare_numeric("x", ref, small_shift, _thresholds(ks_min_statistic=0.03))
    assert f["ks_drift"] and f["drift"] and "KS D" in f["reason"]
    # A large D on 3 values: p not small -> not drift.
    f = compare_numeric("x", ref, [0.0, 0.0, 0.0], _thresholds())
    assert f["ks_statistic"] >= 0.2 and f["ks_pvalue"] >= 0.01 and not f["ks_drift"] and not f["drift"]
    # Both: drift.
    f = compare_numeric("x", ref, [0.0] * 300, _thresholds())
    assert f["ks_statistic"] >= 0.2 and f["ks_pvalue"] < 0.01 and f["ks_drift"] and f["drift"]
    # PSI alone flags too (psi at its default).
    from inferforge.optimize.drift import DriftThresholds

    f = compare_numeric("x", ref, rng.normal(3, 1, size=300), DriftThresholds())
    assert f["psi"] >= 0.2 and f["drift"] and "PSI" in f["reason"]


def test_a_missed_gate_and_a_rising_unknown_rate_count_as_drift():
    from inferforge.optimize.drift import DriftThresholds, drifted_items, unknown_rate

    t = DriftThresholds(max_unknown_rate_increase=0.01)
    quiet = unknown_rate(0.02, 0.02, t)
    assert drifted_items([], [], quiet, None, t) == []
    # The [UNK] rate: a rise beyond the threshold drifts, a rise within it or a fall does not.
    assert unknown_rate(0.01, 0.03, t)["drift"] and not unknown_rate(0.01, 0.015, t)["drift"]
    assert not unknown_rate(0.2, 0.0, t)["drift"]
    assert [d["what"] for d in drifted_items([], [], unknown_rate(0.01, 0.03, t), None, t)] == ["unknown_token_rate"]
    # The gate re-measured on the new texts: a missed limit drifts; a held one, or no re-measure, does not.
    checks = [{"name": "min cosine (new texts)", "measured": 0.93, "op": ">=", "limit": 0.98, "passed": False},
              {"name": "mean cosine (new texts)", "measured": 0.995, "op": ">=", "limit": 0.99, "passed": True}]
    missed = {"available": True, "reference": "src", "checks": checks, "passed": False}
    got = drifted_items([], [], quiet, missed, t)
    assert [d["what"] for d in got] == ["gate min cosine (new texts)"] and "0.9300" in got[0]["reason"]
    held = {**missed, "checks": [{**c, "passed": True} for c in checks], "passed": True}
    assert drifted_items([], [], quiet, held, t) == []
    assert drifted_items([], [], quiet, {"available": False, "note": "no source"}, t) == []


@pytest.mark.parametrize("bad", [
    {"ks_min_statistic": 1.5}, {"ks_min_statistic": 0}, {"psi": 0}, {"psi": float("inf")}, {"psi": float("nan")},
    {"psi": 0.2, "psi_moderate": 0.3}, {"psi_moderate": 0}, {"max_out_of_range": 1.0}, {"max_out_of_range": -0.1},
    {"max_unknown_rate_increase": 1.0}, {"ks_alpha": 0}, {"ks_alpha": 1}, {"min_texts": 1}, {"min_texts": 2.5},
])
def test_thresholds_that_would_disable_a_check_are_refused(bad):
    from inferforge.errors import UserInputError
    from inferforge.optimize.drift import DriftThresholds

    with pytest.raises(UserInputError, match=f"drift threshold {next(iter(bad)) if len(bad) == 1 else 'psi_moderate'}"):
        DriftThresholds(**bad)


def test_edge_thresholds_that_keep_checks_on_are_accepted():
    from inferforge.optimize.drift import DriftThresholds

    DriftThresholds(ks_min_statistic=1.0, max_out_of_range=0.0, max_unknown_rate_increase=0.0, psi=0.05,
                    psi_moderate=0.05)


def test_the_command_refuses_a_disabling_threshold(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(f"text number {i}" for i in range(30)))
    proc = run_cli("drift", tmp_path, "--data", good, "--ks-min-statistic", "1.5")
    assert proc.returncode == 2 and "--ks-min-statistic" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_ks_equals_scipy_ks_2samp():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=400), rng.normal(0.2, 1.1, size=150)
    d, p = ks_test(a, b)
    want = ks_2samp(a, b)
    assert d == want.statistic and p == want.pvalue


def test_numeric_feature_bins_hold_about_40_reference_values():
    rec = numeric_feature(np.arange(160.0))
    assert len(rec["counts"]) == 4 and sum(rec["counts"]) == 160 and min(rec["counts"]) >= 39
    assert len(numeric_feature(np.arange(4000.0))["counts"]) == 10


def test_token_buckets_put_unseen_tokens_last():
    ranked, cuts = token_ranking([[1, 1, 1, 1, 2, 2, 3]])
    assert ranked == [1, 2, 3]
    counts = token_bucket_counts([[1, 2, 3, 99, 98]], ranked, cuts)
    assert counts[-1] == 2 and sum(counts) == 5


# ----------------------------------------------------------------------------------------------
# The demo artifact (the shared demo job: slow)


def test_snapshot_is_written_into_the_demo_artifact(demo_run):
    out, _, _ = demo_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert "drift_snapshot.json" in manifest["files"]
    snapshot = json.loads((out / "drift_snapshot.json").read_text())
    assert manifest["drift_snapshot"]["texts_sha256"] == snapshot["texts_sha256"]
    assert snapshot["kind"] == "sentence-encoder" and snapshot["texts"] == 160
    assert {"length_tokens", "embedding_norm", "projection_1", "projection_4"} <= set(snapshot["features"])
    assert np.asarray(snapshot["projection"]["components"]).shape == (4, 384)
    assert snapshot["token_frequency"]["ranked_ids"] and snapshot["unknown_token"]["rate"] == 0.0
    layers = snapshot["activations"]["layers"]
    assert len(layers) >= 20 and all(v["min"] < v["max"] for v in layers.values())


def test_held_out_fortunes_are_not_flagged(demo_run):
    from inferforge.optimize.drift import check_drift

    out, _, _ = demo_run
    held_out = read_sentences("demo")[160:480]
    report = check_drift(out, random.Random(0).sample(held_out, 200))
    assert not report.drift, report.drifted
    assert report.gate["available"] and report.gate["passed"]
    assert all(f["psi"] < 0.2 for f in report.features)


@pytest.mark.parametrize("name", ["support_queries", "python_docs"])
def test_off_domain_traffic_is_flagged_with_reports(demo_run, tmp_path, name):
    out, _, _ = demo_run
    proc = run_cli("drift", out, "--data", DATA / f"{name}.txt", "--output", tmp_path / "report")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("DRIFT") and "  projection_1: " in proc.stdout
    report = json.loads((tmp_path / "report" / "drift_report.json").read_text())
    assert report["drift"] and report["thresholds"]["psi"] == 0.2
    html = (tmp_path / "report" / "drift_report.html").read_text()
    assert html.count("<svg") >= 7 and "<script" not in html
    assert "PSI >= 0.2" in (tmp_path / "report" / "drift_report.md").read_text()


def test_thresholds_are_configurable_and_json_goes_to_stdout(demo_run):
    out, _, _ = demo_run
    proc = run_cli("drift", out, "--data", DATA / "support_queries.txt", "--json", "--psi-threshold", "100",
                   "--ks-min-statistic", "0.99", "--no-gate")
    report = json.loads(proc.stdout)
    assert report["thresholds"]["psi"] == 100 and report["gate"] is None
    assert proc.returncode == (1 if report["drifted"] else 0)
    assert all(not d["what"].startswith(("projection", "length")) for d in report["drifted"])


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2


def _one_line_exit_2(proc, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift-llm")
    path = save_tiny_llama(root / "tiny")
    save_word_tokenizer(path)
    return path, save_word_text(root / "cal.txt", lines=60)


def test_bad_inputs_exit_2_with_one_line(tmp_path, tiny_lm):
    from inferforge.artifact import package_checkpoint

    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no text field"}\n')
    good = tmp_path / "good.txt"
    good.write_text("\n".join(f"text number {i}" for i in range(30)))
    _one_line_exit_2(run_cli("drift", "minilm@prod", "--data", good), "minilm@prod")
    _one_line_exit_2(run_cli("drift", tmp_path, "--data", tmp_path / "empty.txt"), "empty file")
    _one_line_exit_2(run_cli("drift", tmp_path, "--data", tmp_path / "bad.jsonl"), '"text"')
    _one_line_exit_2(run_cli("drift", tmp_path, "--data", tmp_path / "missing.txt"), "no such file")
    old = package_checkpoint(tiny_lm[0], tmp_path / "old-artifact")     # an artifact with no snapshot
    _one_line_exit_2(run_cli("drift", old, "--data", good), "re-run `inferforge quantize`")
    _one_line_exit_2(run_cli("drift", old, "--data", good, "--ks-alpha", "2"), "ks_alpha")


# ----------------------------------------------------------------------------------------------
# A causal LM


def test_lm_snapshot_has_next_token_entropy_and_the_check_runs(tiny_lm, tmp_path):
    from inferforge.cli import main
    from inferforge.optimize.drift import check_drift

    path, cal = tiny_lm
    out = tmp_path / "q8"
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--calibration", str(cal), "--num-samples",
                 "4", "--seq-len", "16", "--skip", "lm_head", "--output", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    snapshot = json.loads((out / "drift_snapshot.json").read_text())
    assert "drift_snapshot.json" in manifest["files"] and snapshot["kind"] == "causal-lm"
    entropy = snapshot["features"]["next_token_entropy"]
    assert entropy["n"] > 50 and 0 < entropy["mean"] <= np.log(256) + 1e-6
    assert "model.layers.0.self_attn.q_proj" in snapshot["activations"]["layers"]
    same = save_word_text(tmp_path / "same.txt", lines=30, seed=1).read_text().splitlines()
    report = check_drift(out, same).to_dict()
    names = {f["name"] for f in report["features"]}
    assert {"next_token_entropy", "length_tokens", "token_frequency"} <= names and report["activations"]
    # Text of only a few words: the token-frequency buckets move.
    narrow = [" ".join(f"w{3 + (i * 7 + j) % 5}" for j in range(40)) for i in range(30)]
    shifted = check_drift(out, narrow)
    assert shifted.drift and any(d["what"] == "token_frequency" for d in shifted.drifted)


def _synthetic_report() -> dict:
    from dataclasses import asdict

    from inferforge.optimize.drift import DriftThresholds, compare_numeric, drifted_items, unknown_rate

    rng = np.random.default_rng(5)
    t = DriftThresholds()
    features = [compare_numeric("projection_1", numeric_feature(rng.normal(-0.01, 0.02, size=400)),
                                rng.normal(0.01, 0.02, size=200), t),
                compare_numeric("length_tokens", numeric_feature(rng.integers(5, 40, size=400).astype(float)),
                                rng.integers(5, 60, size=200).astype(float), t)]
    features.append({"name": "token_frequency", "psi": 0.3, "psi_band": "significant",
                     "labels": ["top 25%", "25-50%", "50-75%", "75-90%", "90-100%", "unseen"],
                     "reference_counts": [25, 25, 25, 15, 8, 2], "new_counts": [20, 20, 20, 15, 10, 15],
                     "drift": True, "reason": "PSI 0.300 >= 0.2"})
    unk = unknown_rate(0.0, 0.0, t)
    return {"artifact": "runs/synthetic", "kind": "sentence-encoder", "texts": 200, "reference_texts": 400,
            "thresholds": {**asdict(t), "psi_epsilon": 1e-4}, "features": features, "activations": [],
            "unknown_token_rate": unk, "gate": None, "drifted": drifted_items(features, [], unk, None, t),
            "notes": [], "drift": True}


def test_html_report_draws_bin_shares_as_grouped_bars_with_interval_labels(tmp_path):
    import re

    from inferforge.optimize.drift_report import _bin_labels, render_html

    assert _bin_labels({"edges": [-0.0227241, -0.00671234, 0.0316, 12345.0]}) == [
        "<= -0.0227", "(-0.0227, -0.00671]", "(-0.00671, 0.0316]", "(0.0316, 1.23e+04]", "> 1.23e+04"]
    report = _synthetic_report()
    html = render_html(report)
    (tmp_path / "drift_report.html").write_text(html)
    hists = re.findall(r'<svg[^>]*id="hist-\d+".*?</svg>', html, flags=re.S)
    assert len(hists) == 3
    for svg, feature in zip(hists, report["features"]):
        assert "<polyline" not in svg                                  # no line across categorical bins
        groups = re.findall(r'<g class="series bars" data-series="([^"]+)"', svg)
        assert groups == ["calibration", "new texts"]
        bins = len(feature["reference_counts"])
        assert svg.count('class="bar"') == 2 * bins
    assert "(-0.0" in hists[0] and "--" not in re.sub(r"<!--.*?-->", "", hists[0])
    assert "&lt;= " in hists[0] and "&gt; " in hists[0]
