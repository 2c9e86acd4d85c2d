"""False-positive and detection rates of `inferforge drift` on a demo artifact (numbers for the README).

    python scripts/measure_drift_rates.py runs/minilm-int8 [--samples 50] [--size 200] [--no-gate]

In-distribution: `--samples` random samples (seeds 0..) of `--size` held-out fortunes sentences (the
demo's sentences after the 160 calibration ones, never used for calibration); the share flagged is
the false-positive rate. Off-domain: the same number of random samples of `--size` texts (at most 3/4 of
the file) from tests/data/support_queries.txt and tests/data/python_docs.txt; the share
flagged is the detection rate. Prints one JSON object, and what triggered per sample.
"""

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from inferforge.data import read_sentences
from inferforge.optimize.drift import DriftThresholds, check_drift

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def rate(artifact, pool, samples, size, thresholds):
    flagged, triggers = 0, Counter()
    for seed in range(samples):
        sample = random.Random(seed).sample(pool, min(size, len(pool) * 3 // 4))
        report = check_drift(artifact, sample, thresholds)
        flagged += report.drift
        triggers.update(d["what"] for d in report.drifted)
    return {"samples": samples, "size": min(size, len(pool) * 3 // 4), "flagged": flagged,
            "rate": flagged / samples, "triggers": dict(triggers)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--no-gate", action="store_true")
    args = parser.parse_args()
    thresholds = DriftThresholds(check_gate=not args.no_gate)
    held_out = read_sentences("demo")[160:480]
    result = {"thresholds": thresholds.__dict__,
              "held_out_fortunes": rate(args.artifact, held_out, args.samples, args.size, thresholds)}
    for name in ("support_queries", "python_docs"):
        pool = (DATA / f"{name}.txt").read_text().splitlines()
        result[name] = rate(args.artifact, pool, args.samples, args.size, thresholds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
