#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with a CUDA device: build with the CUDA
# kernels, run the test suite on CUDA (Triton compiled, not interpreted), then every
# benchmark; tables go to stdout and JSON/PNG under ${OUT:-gpu-results}. A failing test
# does not stop the benchmarks; the script's exit status is the tests' (or the first
# later failure's).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
FLIPKERN_CUDA=1 pip install --quiet --no-build-isolation -e ".[test]" || exit 1
python -m flipkern.info | tee "$out/info.txt"
# With a CUDA device every backend is required (tests/conftest.py): a missing one fails.
python -m pytest tests -q 2>&1 | tee "$out/tests.txt"
status=$?
python -m pytest benchmarks -q --benchmark-json "$out/bench.json" 2>&1 | tail -n 40
[ "$status" -eq 0 ] || echo "run_gpu: tests failed (see $out/tests.txt); benchmarks ran anyway"
png=()
python -c "import matplotlib" 2>/dev/null && png=(--png "$out/bench.png")  # the plot is optional
if ! python benchmarks/report.py "$out/bench.json" "${png[@]}" | tee "$out/bench.md"; then
  [ "$status" -ne 0 ] || status=1
fi
python benchmarks/bench_e2e.py --json "$out/e2e.json" | tee "$out/e2e.md" || { [ "$status" -ne 0 ] || status=1; }
exit "$status"
