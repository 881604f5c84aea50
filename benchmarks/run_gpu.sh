#!/usr/bin/env bash
# The one GPU command: the GPU tests, then the GPU benchmarks, then one table.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]     # OUT_DIR: else $OUT, else gpu-results/
#
# Needs a CUDA device and `pip install -e ".[test]"` done; touches no network (a missing
# CUDA build is redone with --no-deps). Every output and JSON goes under OUT_DIR:
#   build.txt, info.txt, tests-*.txt (pytest -rs per group), gpu_ops.json/.txt (each op,
#   each backend, torch native), e2e_gpu.json/.txt (a bf16 training step: fast path vs
#   open_clip stock), table.md (the summary printed last), timing.txt (seconds per stage).
# Exit status: non-zero if any stage failed (a failing stage does not stop the later ones).
#
# Sizing, for 8 minutes on one H100/H200 (timing.txt records the real split):
#   CUDA build   0 s when pip install -e already compiled the CUDA kernels (it does on a GPU
#                machine); else one arch, ~2-3 min on 16 cores
#   GPU tests    four pytest processes at once (the Triton JIT compiles, ~100 kernel
#                variants, are the cost and run on the CPUs in parallel): ~2-3 min;
#                per test at most a few hundred launches on shapes of <= 1k tokens
#   gpu_ops      21 (case, impl) processes x ~5 s (start, compile, 25 ms warm-up, 200 ms
#                of timed repeats): ~2 min
#   bench_e2e    masks 0 and 0.75 x (fast, native, open_clip, open_clip+fk), one repeat,
#                5 timed steps after 2 warm-up steps, one process each: ~1 min
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
: > "$out/timing.txt"
status=0
fail() { echo "run_gpu: FAILED: $1" | tee -a "$out/failures.txt"; status=1; }
mark() { echo "$1 $((SECONDS - t_stage)) s" >> "$out/timing.txt"; t_stage=$SECONDS; }
t_stage=$SECONDS

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run_gpu: no CUDA device (torch.cuda.is_available() is False); nothing run" >&2
  exit 1
fi

has_cuda_kernels() {
  python -c "import sys, flipkern; sys.exit(0 if flipkern.info()['cuda_kernels_compiled'] else 1)" 2>/dev/null
}
if ! has_cuda_kernels; then
  FLIPKERN_CUDA=1 pip install --no-deps --no-build-isolation -e . > "$out/build.txt" 2>&1 || fail "CUDA build (build.txt)"
  has_cuda_kernels || { fail "flipkern has no CUDA kernels after the build (build.txt)"; exit 1; }
fi
python -m flipkern.info > "$out/info.txt" 2>&1
mark build

# GPU tests only: the test_gpu_* files, the CUDA cases of the CPU files, and that every backend
# is usable (so that no GPU test skips for a missing backend; only the two-GPU ones may skip).
groups=(
  "masking:tests/test_gpu_masking.py"
  "attention:tests/test_gpu_attention.py"
  "attention-dtypes:tests/test_attention_ops.py::test_varlen_attention_cuda"
  "losses-fastpath:tests/test_gpu_losses.py tests/test_losses.py::test_on_cuda tests/test_gpu_fastpath.py tests/test_pretrain.py::test_two_processes_match_one tests/test_build.py"
)
pids=()
for g in "${groups[@]}"; do
  name=${g%%:*}
  read -r -a files <<< "${g#*:}"
  python -m pytest "${files[@]}" -q -rs -p no:cacheprovider \
    > "$out/tests-$name.txt" 2>&1 &
  pids+=("$!")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || fail "tests ${groups[$i]%%:*} (tests-${groups[$i]%%:*}.txt)"
  tail -n 1 "$out/tests-${groups[$i]%%:*}.txt"
done
mark tests

python benchmarks/gpu_ops.py --json "$out/gpu_ops.json" > "$out/gpu_ops.txt" 2>&1 || fail "gpu_ops (gpu_ops.txt)"
mark gpu_ops

python benchmarks/bench_e2e.py --device cuda --dtype bfloat16 --json "$out/e2e_gpu.json" \
  --masks 0 0.75 --cases fast native open_clip open_clip+fk --repeats 1 --steps 5 --warmup 2 \
  > "$out/e2e_gpu.txt" 2>&1 || fail "bench_e2e (e2e_gpu.txt)"
mark e2e

echo
if [ -f "$out/gpu_ops.json" ]; then
  python benchmarks/gpu_ops.py --table "$out/gpu_ops.json" --e2e "$out/e2e_gpu.json" | tee "$out/table.md"
else
  fail "no gpu_ops.json: no table"
fi
echo
cat "$out/timing.txt"
echo "run_gpu: total $SECONDS s; outputs in $out/; exit $status"
exit "$status"
