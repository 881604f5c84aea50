"""benchmarks/gpu_ops.py and benchmarks/run_gpu.sh without a GPU: every case measures on tiny
CPU shapes (no timing is checked), the table renders from JSON, and the shell script parses."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_ops  # noqa: E402

from flipkern import backends  # noqa: E402


@pytest.fixture
def small(monkeypatch):
    for name in ("B", "IMG", "P", "K", "D", "N", "H", "DH", "LONG_B", "LONG_L", "LOSS_N", "LOSS_D"):
        monkeypatch.setattr(gpu_ops, name, getattr(gpu_ops, name))  # restored after the test
    gpu_ops.use_small_shapes()


def _cpu_impls():
    return ["native"] + (["triton"] if backends.triton_interpret() and backends.backend_status("triton")[0] else [])


@pytest.mark.parametrize("case", gpu_ops.CASES)
def test_every_case_measures_on_small_cpu_shapes(small, case):
    for impl in _cpu_impls():
        r = gpu_ops.measure(case, impl, device="cpu")
        assert r["case"] == case and r["impl"] == impl and r["ms"] > 0 and r["value"] > 0
        assert r["metric"] == ("GB/s" if case in ("drop_tokens", "gather_patches", "restore_tokens") else "TFLOP/s")


def test_a_case_runs_in_its_own_process_and_a_failure_is_recorded(small, tmp_path, capsys):
    out = tmp_path / "ops.json"
    # native runs; flipkern's cuda backend cannot run on CPU tensors: an error entry, exit 1
    rc = gpu_ops.main(["--small", "--device", "cpu", "--cases", "drop_tokens", "--impls", "native", "cuda",
                       "--json", str(out)])
    results = json.load(open(out))["results"]
    assert rc == 1 and [r["impl"] for r in results] == ["native", "cuda"]
    assert results[0]["value"] > 0 and "cannot run on cpu" in results[1]["error"]
    assert "| drop_tokens |" in capsys.readouterr().out


SAMPLE = [dict(case="attn_vision", impl="triton", dtype="bfloat16", ms=1.0, metric="TFLOP/s", value=300.0),
          dict(case="attn_vision", impl="cuda", dtype="bfloat16", ms=10.0, metric="TFLOP/s", value=30.0),
          dict(case="attn_vision", impl="native", dtype="bfloat16", ms=0.8, metric="TFLOP/s", value=375.0),
          dict(case="drop_tokens", impl="triton", dtype="bfloat16", ms=0.5, metric="GB/s", value=2000.0),
          dict(case="drop_tokens", impl="cuda", error="RuntimeError: boom"),
          dict(case="drop_tokens", impl="native", dtype="bfloat16", ms=1.0, metric="GB/s", value=1000.0)]
# bench_e2e's JSON: a per-(case, mask) summary with the minimum step time
E2E = dict(summary=[dict(case="fast", mask=0.75, step_s_min=0.050), dict(case="open_clip", mask=0.75, step_s_min=0.150),
                    dict(case="open_clip+fk", mask=0.75, step_s_min=0.075), dict(case="native", mask=0.75,
                                                                                   step_s_min=0.1)])


def test_table_from_json(tmp_path, capsys):
    ops, e2e = tmp_path / "ops.json", tmp_path / "e2e.json"
    ops.write_text(json.dumps(dict(results=SAMPLE)))
    e2e.write_text(json.dumps(E2E))
    assert gpu_ops.main(["--table", str(ops), "--e2e", str(e2e)]) == 1  # a failed case fails the table
    lines = capsys.readouterr().out.splitlines()
    attn = next(ln for ln in lines if ln.startswith("| attn_vision |"))
    assert "300.0 TFLOP/s (1.000 ms)" in attn and "375.0 TFLOP/s" in attn and attn.endswith("| 0.80x |")
    drop = next(ln for ln in lines if ln.startswith("| drop_tokens |"))
    assert "failed: RuntimeError: boom" in drop and drop.endswith("| 2.00x |")
    e2e_row = next(ln for ln in lines if ln.startswith("| step time (min) | 0.75 |"))
    assert "50.0 ms | 150.0 ms | 75.0 ms | 3.00x |" in e2e_row


def test_table_without_e2e_json(tmp_path, capsys):
    ops = tmp_path / "ops.json"
    ops.write_text(json.dumps(dict(results=[r for r in SAMPLE if "error" not in r])))
    assert gpu_ops.main(["--table", str(ops), "--e2e", str(tmp_path / "missing.json")]) == 0
    assert "end to end" not in capsys.readouterr().out


def test_run_gpu_script_parses_and_refuses_without_cuda(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "run_gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run for real")
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stdout + r.stderr
    assert (tmp_path / "out").is_dir()
