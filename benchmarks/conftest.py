"""Shared setup for the benchmarks (pytest-benchmark).

Conventions every benchmark follows, so benchmarks/report.py can compare them:
  benchmark.group = "<op> <shape, dtype, device>"   the case; all impls of a case share it
  benchmark.extra_info["impl"] = "flipkern" | "reference" | "torch-..."   who ran
  benchmark.extra_info["bytes"] / ["flops"] / ["peak_mem_bytes"]   optional, for GB/s etc.
The JSON's machine_info also carries run_info.run_info() (torch, threads, commit, command,
load average at the start and the end of the session).
Run:  python -m pytest benchmarks --benchmark-json bench.json && python benchmarks/report.py bench.json
"""
import pytest
import run_info
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device_sync():
    return sync



_RUN = run_info.run_info()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update({k: v for k, v in _RUN.items() if k != "machine"})
    machine_info["loadavg_end"] = run_info.load_average()
