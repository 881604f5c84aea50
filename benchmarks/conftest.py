"""Shared setup for the benchmarks (pytest-benchmark).

Conventions every benchmark follows, so benchmarks/report.py can compare them:
  benchmark.group = "<op> <shape, dtype, device>"   the case; all impls of a case share it
  benchmark.extra_info["impl"] = "flipkern" | "reference" | "torch-..."   who ran
  benchmark.extra_info["bytes"] / ["flops"] / ["peak_mem_bytes"]   optional, for GB/s etc.
Run:  python -m pytest benchmarks --benchmark-json bench.json && python benchmarks/report.py bench.json
"""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def device_sync():
    return sync


def pytest_collect_file(file_path, parent):
    # The suites are named bench_*.py (not test_*.py, so `pytest tests` never runs them):
    # collect them here, so that `python -m pytest benchmarks` finds them without a config file.
    # (A file named on the command line is collected by pytest itself.)
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
