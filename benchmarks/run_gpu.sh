#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with a CUDA device: build with the CUDA
# kernels, run the test suite on CUDA (Triton compiled, not interpreted), then every
# benchmark; tables go to stdout and JSON/PNG under ${OUT:-gpu-results}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
FLIPKERN_CUDA=1 pip install --quiet --no-build-isolation -e ".[test]"
python -m flipkern.info | tee "$out/info.txt"
FLIPKERN_REQUIRE_BACKENDS=cpu,cuda,triton python -m pytest tests -q -x 2>&1 | tee "$out/tests.txt"
python -m pytest benchmarks -q --benchmark-json "$out/bench.json" 2>&1 | tail -n 40
python benchmarks/report.py "$out/bench.json" --png "$out/bench.png" | tee "$out/bench.md"
