#!/usr/bin/env bash
# One call on the GPU machine: kernel correctness tests (fp16, fp32 and bf16, compiled) and the
# kernel benchmarks. Full results go under $OUT; a short table is printed last.
#
#   bash scripts/gpu_check.sh            # OUT defaults to ./gpu-results
#
# The GPU image has torch and triton but not this project's other dependencies and no internet,
# so nothing is installed: the inferforge namespace is assembled from the source folders with links.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/inferforge"
cp -r inferforge/. "$STAGE/inferforge/"
for sub in kernels optimize bench; do ln -s "$PWD/$sub" "$STAGE/inferforge/$sub"; done
export PYTHONPATH="$STAGE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/environment.txt"

# Correctness: one fixed config (INFERFORGE_AUTOTUNE=0) so every case compiles once.
INFERFORGE_AUTOTUNE=0 timeout 300 python -m pytest tests/kernels -q -x -p no:cacheprovider \
  --junitxml="$OUT/kernel-tests.xml" > "$OUT/kernel-tests.log" 2>&1
tests_rc=$?

# Benchmarks: autotuned, bf16 (quick grid by default; BENCH_FULL=1 for every sequence length).
quick="--quick"; [ "${BENCH_FULL:-0}" = "1" ] && quick=""
timeout 420 python -m inferforge.bench.kernels.bench_attention $quick --dtype bfloat16 \
  --out "$OUT/attention-bf16.md" > "$OUT/bench-attention.log" 2>&1
bench_rc=$?

echo
echo "== kernel tests (exit $tests_rc) =="
tail -n 3 "$OUT/kernel-tests.log"
echo "== attention benchmark (exit $bench_rc) =="
if [ -f "$OUT/attention-bf16.md" ]; then cat "$OUT/attention-bf16.md"; else tail -n 20 "$OUT/bench-attention.log"; fi
exit $(( tests_rc != 0 || bench_rc != 0 ))
