"""`inferforge drift ARTIFACT_OR_NAME@ALIAS --data NEW.txt|jsonl`: new traffic against the artifact's
calibration snapshot (see `inferforge.optimize.drift`). Exit 0 no drift, 1 drift, 2 bad input.

With `--recalibrate` (see `inferforge.drift_recalibrate`): exit 0 no drift, or drift and a
recalibrated artifact that passed every gate and target (registered, `--promote ALIAS` moved);
1 drift and the recalibration missed a gate or target (nothing registered, the alias unchanged,
the reports in OUT.failed/); 2 bad input."""

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
                       epilog="exit codes:\n  0    no drift (with --recalibrate: or drift and a recalibrated artifact "
                              "that passed every gate and target, registered and promoted)\n"
                              "  1    drift beyond a threshold (named, with the numbers); with --recalibrate: drift and "
                              "the recalibration missed a gate or target (nothing registered, alias unchanged, "
                              "reports in OUT.failed/)\n"
                              "  2    bad input (no such artifact, no snapshot, an empty or malformed data file, an "
                              "artifact without a recipe for --recalibrate)\n"
                              "examples:\n  inferforge drift runs/minilm-int8 --data queries.txt --output drift-report\n"
                              "  inferforge drift minilm@prod --data traffic.txt --recalibrate --promote prod")
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
    r = p.add_argument_group("recalibration", "on drift, re-run the artifact's recipe with the new texts mixed into "
                                              "calibration, gate it on the old and the new held-out texts, and "
                                              "register it only if every gate and target holds")
    r.add_argument("--recalibrate", action="store_true", help="on drift, recalibrate (a .txt --data; the artifact "
                                                              "must come from a recipe run)")
    r.add_argument("--force", action="store_true", help="recalibrate even without drift")
    r.add_argument("--promote", metavar="ALIAS", help="point NAME@ALIAS at the new version when it passes (needs "
                                                      "NAME@ALIAS as the artifact, or --name)")
    r.add_argument("--name", help="register the new artifact under this name (default: the NAME of NAME@ALIAS; a "
                                  "directory without --name is not registered)")
    r.add_argument("--artifact-output", metavar="DIR", help="where the new artifact goes (default "
                                                            "runs/RECIPE-recal-TIMESTAMP); a failed run's reports go "
                                                            "to DIR.failed/")
    r.add_argument("--min-cosine", type=float, help="override the recipe's min_cosine gate for the recalibrated model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_drift)


def read_traffic(path: str | Path) -> list[str]:
    """Non-empty lines of a .txt file, or the "text" fields of a .jsonl file."""
    from inferforge.optimize.calibration import read_texts

    return read_texts(path, flag="--data")


def cmd_drift(args) -> int:
    from inferforge.fileio import atomic_write_text
    from inferforge.optimize.drift import DriftThresholds, check_drift, resolve_artifact
    from inferforge.optimize.drift_report import render_html, render_markdown

    thresholds = DriftThresholds(psi=args.psi_threshold, psi_moderate=min(0.1, args.psi_threshold), ks_alpha=args.ks_alpha,
                                 ks_min_statistic=args.ks_min_statistic, max_out_of_range=args.max_out_of_range,
                                 max_unknown_rate_increase=args.max_unknown_rate_increase, check_gate=not args.no_gate)

    def write_reports(report: dict) -> None:
        if args.output:
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "drift_report.json", json.dumps(report, indent=1) + "\n")
            atomic_write_text(out / "drift_report.md", render_markdown(report))
            atomic_write_text(out / "drift_report.html", render_html(report))

    if args.recalibrate:
        return _cmd_recalibrate(args, thresholds, write_reports)
    given = [flag for flag, value in (("--force", args.force), ("--promote", args.promote), ("--name", args.name),
                                      ("--artifact-output", args.artifact_output),
                                      ("--min-cosine", args.min_cosine is not None)) if value]
    if given:
        raise UserInputError(f"{', '.join(given)} belong(s) to --recalibrate; add --recalibrate or drop them")
    artifact = resolve_artifact(args.artifact)
    texts = read_traffic(args.data)
    report = check_drift(artifact, texts, thresholds).to_dict()
    write_reports(report)
    _print_report(args, report, artifact)
    return 1 if report["drift"] else 0


def _print_report(args, report: dict, artifact, extra: dict | None = None) -> None:
    if args.json:
        print(json.dumps({**report, **(extra or {})}))
    else:
        print(f"{'DRIFT' if report['drift'] else 'no drift'}: {report['texts']} texts vs {report['reference_texts']} "
              f"calibration texts of {artifact}")
        for d in report["drifted"]:
            print(f"  {d['what']}: {d['reason']}")
    if report["drift"]:
        print("drift: " + "; ".join(f"{d['what']} ({d['reason']})" for d in report["drifted"][:5]), file=sys.stderr)


def _cmd_recalibrate(args, thresholds, write_reports) -> int:
    from inferforge.drift_recalibrate import recalibrate
    from inferforge.progress import Progress

    progress = Progress(quiet=args.quiet)

    def on_report(report: dict) -> None:
        write_reports(report)
        if not args.json:
            _print_report(args, report, args.artifact)
        elif report["drift"]:
            print("drift: " + "; ".join(f"{d['what']} ({d['reason']})" for d in report["drifted"][:5]),
                  file=sys.stderr)

    outcome = recalibrate(args.artifact, args.data, thresholds=thresholds, force=args.force, name=args.name,
                          promote=args.promote, output=args.artifact_output, min_cosine=args.min_cosine,
                          progress=progress, on_drift_report=on_report)
    summary = outcome.to_dict()
    if args.json:
        print(json.dumps({**outcome.drift, "recalibration": summary}))
    elif outcome.ran:
        print(f"recalibrated ({outcome.trigger}) in {outcome.duration_s:.0f} s: {summary['artifact']}")
        for c in summary["checks"]:
            print(f"  {c['name']}: {c['measured']:.4g} {c['op']} {c['limit']:.4g}  {'ok' if c['passed'] else 'MISSED'}")
        if outcome.version is not None:
            print(f"registered {outcome.version.ref}" + (f"; {outcome.registered_as}@{outcome.promoted} -> version "
                                                         f"{outcome.version.version}" if outcome.promoted else ""))
        else:
            print("not registered (give NAME@ALIAS or --name to register it)")
    return 0
