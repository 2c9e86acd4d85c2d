"""Is an encoder artifact's model.onnx as fast in anyone's ONNX Runtime session as in inferforge's?

    python -m inferforge.bench.plain_session ARTIFACT [--rounds 5] [--threads 2]

Times, interleaved in one process (see `inferforge.bench.latency`), at batch 8 and 1 x 128 tokens:
`inferforge` (the session `inferforge.load` opens, from the artifact's ort_config.json), `plain`
(`onnxruntime.InferenceSession(path)` with only the thread count set and spinning off, so the
providers do not steal each other's cores) and `skiplayernorm-off` (the session older artifacts
get: SkipLayerNormFusion disabled). Each round's p50 is divided by inferforge's; the medians of those
ratios over the rounds are printed (absolute times on a shared machine say little).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from inferforge.bench.latency import fixed_length_batch, measure_interleaved


def sessions(artifact, threads: int) -> dict:
    import onnxruntime as ort

    from inferforge.encoder import DEFAULT_SESSION_OPTIONS, ort_session
    from inferforge.manifest import verify_artifact
    from inferforge.ort_config import read_session_options

    manifest = verify_artifact(artifact)
    path = f"{artifact}/{manifest['runtime']['model']}"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {"inferforge": ort_session(path, threads=threads, session_options=read_session_options(artifact, manifest)),
            "plain": ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]),
            "skiplayernorm-off": ort_session(path, threads=threads, session_options=DEFAULT_SESSION_OPTIONS)}


def compare(artifact, *, rounds: int = 5, threads: int = 2, batch_sizes=(8, 1), seq_len: int = 128) -> dict:
    """{batch size: {session name: median over rounds of (p50 / inferforge's p50)}}."""
    runs = sessions(artifact, threads)
    vocab = json.loads((Path(artifact) / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    out = {}
    for batch_size in batch_sizes:
        batch = fixed_length_batch(vocab, batch_size, seq_len, rng)
        ratios = {name: [] for name in runs}
        for _ in range(rounds):
            fns = {name: (lambda s=s, b=batch: s.run(None, {i.name: b[i.name] for i in s.get_inputs()}))
                   for name, s in runs.items()}
            stats = measure_interleaved(fns, warmup=3, iterations=20)
            for name in runs:
                ratios[name].append(stats[name]["p50_ms"] / stats["inferforge"]["p50_ms"])
        out[batch_size] = {name: statistics.median(r) for name, r in ratios.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for batch_size, ratios in compare(args.artifact, rounds=args.rounds, threads=args.threads).items():
        print(f"batch {batch_size} x 128: p50 / inferforge.load's: "
              + ", ".join(f"{name} {r:.3f}" for name, r in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
