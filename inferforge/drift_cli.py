"""`inferforge drift ARTIFACT_OR_NAME@ALIAS --data NEW.txt|jsonl`: new traffic against the artifact's
calibration snapshot (see `inferforge.optimize.drift`). Exit 0 no drift, 1 drift, 2 bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inferforge.errors import UserInputError


def add_drift_parser(sub, fmt) -> None:
    """Add the `drift` command to the subparsers `sub` (argparse formatter class `fmt`)."""
    p = sub.add_parser("drift", formatter_class=fmt, help="compare new traffic with an artifact's calibration data",
                       description="Run the artifact over new texts and compare them with the calibration snapshot "
                                   "stored at quantize time (drift_snapshot.json): PSI per feature (input length, "
                                   "token frequency, embedding norm and projections or next-token entropy), the "
                                   "two-sample KS test, the share of activations outside the calibrated ranges per "
                                   "layer, the [UNK] rate, and the accuracy gate re-measured on the new texts when "
                                   "the float source is on disk.",
                       epilog="exit codes:\n  0    no drift\n  1    drift beyond a threshold (named, with the numbers)\n"
                              "  2    bad input (no such artifact, no snapshot, an empty or malformed data file)\n"
                              "example:\n  inferforge drift runs/minilm-int8 --data queries.txt --output drift-report")
    p.add_argument("artifact", help="artifact directory, or NAME@ALIAS when a model registry is available")
    p.add_argument("--data", required=True, metavar="FILE", help=".txt (one text per line) or .jsonl (a \"text\" field "
                                                                 "per line)")
    p.add_argument("-o", "--output", metavar="DIR", help="write drift_report.json, .md and .html here")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--psi-threshold", type=float, default=0.2, help="PSI at or above this is drift (default 0.2)")
    p.add_argument("--ks-alpha", type=float, default=0.01, help="KS p-value below this ... (default 0.01)")
    p.add_argument("--ks-min-statistic", type=float, default=0.2,
                   help="... and KS statistic D at or above this is drift (default 0.2)")
    p.add_argument("--max-out-of-range", type=float, default=0.005,
                   help="largest share of a layer's activations outside the calibrated range (default 0.005)")
    p.add_argument("--max-unknown-rate-increase", type=float, default=0.01,
                   help="largest rise of the [UNK] token rate (default 0.01)")
    p.add_argument("--no-gate", action="store_true", help="do not re-measure the accuracy gate on the new texts")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_drift)


def read_traffic(path: str | Path) -> list[str]:
    """Non-empty lines of a .txt file, or the "text" fields of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--data {path}: no such file")
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserInputError(f"--data {path}: not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"--data {path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserInputError(f"--data {path}, line {number}: expected an object with a \"text\" string")
            texts.append(record["text"])
        else:
            texts.append(line.strip())
    if not texts:
        raise UserInputError(f"--data {path}: no text (empty file)")
    return texts


def cmd_drift(args) -> int:
    from inferforge.fileio import atomic_write_text
    from inferforge.optimize.drift import DriftThresholds, check_drift, resolve_artifact
    from inferforge.optimize.drift_report import render_html, render_markdown

    thresholds = DriftThresholds(psi=args.psi_threshold, ks_alpha=args.ks_alpha,
                                 ks_min_statistic=args.ks_min_statistic, max_out_of_range=args.max_out_of_range,
                                 max_unknown_rate_increase=args.max_unknown_rate_increase, check_gate=not args.no_gate)
    artifact = resolve_artifact(args.artifact)
    texts = read_traffic(args.data)
    report = check_drift(artifact, texts, thresholds).to_dict()
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "drift_report.json", json.dumps(report, indent=1) + "\n")
        atomic_write_text(out / "drift_report.md", render_markdown(report))
        atomic_write_text(out / "drift_report.html", render_html(report))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'DRIFT' if report['drift'] else 'no drift'}: {len(texts)} texts vs {report['reference_texts']} "
              f"calibration texts of {artifact}")
        for d in report["drifted"]:
            print(f"  {d['what']}: {d['reason']}")
    if report["drift"]:
        print("drift: " + "; ".join(f"{d['what']} ({d['reason']})" for d in report["drifted"][:5]), file=sys.stderr)
    return 1 if report["drift"] else 0
