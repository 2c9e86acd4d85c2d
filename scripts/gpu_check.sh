#!/usr/bin/env bash
# One call on the GPU machine: kernel correctness tests (fp16, fp32 and bf16, compiled) and the
# kernel benchmarks. Full results go under $OUT; a short table is printed last.
#
#   bash scripts/gpu_check.sh              # everything (OUT defaults to ./gpu-results)
#   bash scripts/gpu_check.sh decode       # one part: tests | attention | decode | quant
#   bash scripts/gpu_check.sh quant-tests quant   # several parts in one call
#
# Parts: tests (every kernel test + quantization), quant-tests (the quantization kernels and layers
# only), attention, decode (kernels + end to end, then the CUDA-graph test and benchmark), graphs (the
# CUDA-graph part alone), quant. Time limits: 150, 120, 450 (120 compile report + 330 benchmark),
# 200 + 90 + 150, 90 + 150, 240 s; pick parts so one call stays under the device tool's 10 minutes per command.
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
for sub in kernels optimize bench runtime; do ln -s "$PWD/$sub" "$STAGE/inferforge/$sub"; done
# Run from the stage, with the tests copied in: python -m and pytest put the working directory (or the
# tests' root) first on sys.path, where the repository's own inferforge/ would shadow the assembled one.
cp -r tests pyproject.toml "$STAGE/"
cd "$STAGE"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/environment.txt"

parts=" ${*:-all} "
want() { [[ "$parts" == *" all "* || "$parts" == *" $1 "* ]]; }
quick="--quick"; [ "${BENCH_FULL:-0}" = "1" ] && quick=""
tests_rc=0; qtests_rc=0; attention_rc=0; decode_rc=0; quant_rc=0; graphs_rc=0; compile_rc=0

if want tests; then
  # Correctness, compiled, fp16/fp32/bf16: one fixed config (INFERFORGE_AUTOTUNE=0) so each case compiles once.
  INFERFORGE_AUTOTUNE=0 timeout 150 python -m pytest tests/kernels tests/test_quantize.py -q -x -p no:cacheprovider \
    --junitxml="$OUT/kernel-tests.xml" > "$OUT/kernel-tests.log" 2>&1
  tests_rc=$?
fi
if want quant-tests; then
  INFERFORGE_AUTOTUNE=0 timeout 120 python -m pytest tests/kernels/test_weight_only_matmul.py tests/kernels/test_weight_only_gemv.py \
    tests/kernels/test_act_quant.py tests/kernels/test_kv_cache.py tests/test_quantize.py -q -rs -p no:cacheprovider \
    -k "not test_encoder_gate_on_a_bert" \
    --junitxml="$OUT/quant-tests.xml" > "$OUT/quant-tests.log" 2>&1
  qtests_rc=$?
fi
if want attention; then
  # 1. The compile report with this machine's Triton (sm_90: registers, spills, shared memory, wgmma);
  #    16 processes, ~30 s; it also fills Triton's cache for the autotune configs.
  timeout 120 python -m inferforge.kernels.compile_report --kernels attention --jobs 16 \
    --json "$OUT/compile-report-attention.json" > "$OUT/compile-report-attention.md" \
    2> "$OUT/compile-report-attention.log"
  compile_rc=$?
  # 2. Autotuned kernel vs SDPA cuDNN/flash/efficient and flex_attention, bf16: TFLOP/s, speed-ups and their
  #    geometric mean, varlen and sliding window; the per-shape dispatch table (estimated 4-5 min, limit 330 s).
  #    BENCH_FULL=1 adds the FlashAttention-3 grid (not within the limit).
  INFERFORGE_ATTENTION_DISPATCH=kernel timeout 330 python -m inferforge.bench.kernels.bench_attention $quick \
    --dtype bfloat16 --out "$OUT/attention-bf16.md" --dispatch-table "$OUT/attention_dispatch.json" \
    > "$OUT/bench-attention.log" 2>&1
  attention_rc=$?
  [ "$compile_rc" -ne 0 ] && attention_rc=$(( attention_rc + 100 ))
fi
if want decode; then
  timeout 200 python -m inferforge.bench.kernels.bench_decode $quick --out "$OUT/decode.md" \
    > "$OUT/bench-decode.log" 2>&1
  decode_rc=$?
fi
if want decode || want graphs; then
  # CUDA-graph decode (off by default until measured): the capture test, then engine / engine+graphs /
  # transformers static cache at batch 1 on the Llama-3.2-1B shape.
  INFERFORGE_AUTOTUNE=0 timeout 90 python -m pytest tests/runtime/test_cuda_graphs.py -q -rs -p no:cacheprovider \
    > "$OUT/graphs-tests.log" 2>&1
  graphs_rc=$?
  timeout 150 python -m inferforge.bench.kernels.bench_decode_graphs --batch 1 --new-tokens 64 --repeats 3 \
    --out "$OUT/decode-graphs.md" > "$OUT/bench-graphs.log" 2>&1
  graphs_rc=$(( graphs_rc != 0 || $? != 0 ))
fi

if want quant; then
  timeout 240 python -m inferforge.bench.kernels.bench_quant_matmul $quick --out "$OUT/quant-matmul.md" \
    > "$OUT/bench-quant.log" 2>&1
  quant_rc=$?
fi

echo
if [ -f "$OUT/kernel-tests.log" ]; then echo "== kernel tests (exit $tests_rc) =="; tail -n 3 "$OUT/kernel-tests.log"; fi
if [ -f "$OUT/quant-tests.log" ]; then
  echo "== quantization tests (exit $qtests_rc) =="; grep -E "^(FAILED|ERROR)" "$OUT/quant-tests.log" | head -20
  tail -n 3 "$OUT/quant-tests.log"
fi
if [ -f "$OUT/graphs-tests.log" ]; then echo "== CUDA-graph tests =="; tail -n 3 "$OUT/graphs-tests.log"; fi
for name in attention decode graphs quant; do
  log="$OUT/bench-$name.log"; [ -f "$log" ] || continue
  case "$name" in attention) md="$OUT/attention-bf16.md" ;; decode) md="$OUT/decode.md" ;; graphs) md="$OUT/decode-graphs.md" ;; quant) md="$OUT/quant-matmul.md" ;; esac
  echo "== $name benchmark =="
  if [ "$name" = attention ] && [ -f "$OUT/compile-report-attention.md" ]; then
    echo "-- compile report (sm_90, exit $compile_rc) --"; cat "$OUT/compile-report-attention.md"
    grep -v Warn "$OUT/compile-report-attention.log" | tail -n 5
  fi
  if [ -f "$md" ]; then cat "$md"; else tail -n 20 "$log"; fi
done
exit $(( tests_rc != 0 || qtests_rc != 0 || attention_rc != 0 || decode_rc != 0 || quant_rc != 0 || graphs_rc != 0 ))
