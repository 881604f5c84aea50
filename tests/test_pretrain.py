"""The pretraining job on a micro configuration (a few steps, seconds each):
resume == uninterrupted, 2 processes == 1 process, error exits, the NaN guard,
SIGTERM checkpointing, output files, precisions and masking schedules."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flipkern.pretrain import checkpoint as ckpt
from flipkern.pretrain.cli import main
from flipkern.pretrain.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A micro model and dataset: 16x16 images in 4x4 patches (16 tokens), 8 of them kept.
MICRO = ["--image-size", "16", "--patch-size", "4", "--context-length", "24",
         "--model-override", "vision.width=32", "--model-override", "vision.depth=1",
         "--model-override", "vision.heads=2",
         "--model-override", "text.width=32", "--model-override", "text.depth=1",
         "--model-override", "text.heads=2", "--model-override", "embed_dim=16",
         "--batch-size", "8", "--val-samples", "16", "--eval-batch-size", "16", "--workers", "0",
         "--no-progress", "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "2", "--no-plot",
         "--threads", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _train_records(out):
    keep = ("step", "loss", "lr", "grad_norm", "logit_scale", "masked")
    return [{k: r[k] for k in keep} for r in read_metrics(os.path.join(out, "metrics.jsonl"))
            if r["type"] == "train"]


def _eval_records(out):
    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["type"] == "eval"]


def _read_config(out):
    return json.load(open(os.path.join(out, "config.json")))


def _final_state(out):
    return ckpt.load(ckpt.latest_checkpoint(out))


def test_outputs_and_summary(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "3", "--output-dir", out, "--checkpoint-every", "1", "--keep-checkpoints", "2",
                         "--eval-every", "2"]) == 0
    stdout = capsys.readouterr().out
    line = [ln for ln in stdout.splitlines() if "done:" in ln][-1]
    assert "steps=3" in line and "img/s=" in line and "zero-shot top-1=" in line and "backends" in line
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["args"]["steps"] == 3 and cfg["num_patches"] == 16 and cfg["num_keep"] == 8
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3]  # keep-last-2
    assert len(_train_records(out)) == 3
    ev = _eval_records(out)
    assert [r["step"] for r in ev] == [2, 3]
    assert 0 <= ev[-1]["zeroshot_top1"] <= 1 and ev[-1]["num_classes"] == 30
    state = _final_state(out)
    assert state["step"] == 3 and state["data_step"] == 3
    assert {"model", "optimizer", "scheduler", "rng"} <= set(state)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 3 and "zeroshot_top1" in summary["eval"]


def test_curve_png(tmp_path):
    out = str(tmp_path / "run")
    args = [a for a in MICRO if a != "--no-plot"]
    assert main(args + ["--steps", "2", "--output-dir", out]) == 0
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_matches_uninterrupted(tmp_path):
    common = MICRO + ["--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "0", "--eval-every", "3",
                      "--unmasked-tune-steps", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--output-dir", a]) == 0
    # b "crashes" after step 5: the last checkpoint is step 4, the metrics already hold step 5
    assert main(common + ["--output-dir", b, "--debug-stop-after", "5"]) == 0
    assert max(s for s, _ in ckpt.list_checkpoints(b)) == 4
    assert _train_records(b)[-1]["step"] == 5
    # a fresh process auto-resumes from b's latest checkpoint
    r = subprocess.run([sys.executable, "-m", "flipkern.pretrain", *common, "--output-dir", b],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    assert _train_records(a) == _train_records(b)  # bit-exact losses, lrs, grad norms
    assert _eval_records(a)[-1] | {"step": 0} == _eval_records(b)[-1] | {"step": 0}
    sa, sb = _final_state(a), _final_state(b)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


@pytest.mark.parametrize("device", [
    "cpu",  # gloo: any machine holds two CPU ranks
    pytest.param("cuda", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two ranks need two GPUs")),
])
def test_two_processes_match_one(tmp_path, device):
    common = MICRO + ["--steps", "4", "--checkpoint-every", "0", "--no-eval", "--mask-ratio", "0.5",
                      "--device", device]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(common + ["--output-dir", one]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flipkern.pretrain", *common, "--output-dir", two]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert json.load(open(os.path.join(two, "config.json")))["world_size"] == 2
    ra, rb = _train_records(one), _train_records(two)
    assert [x["step"] for x in ra] == [x["step"] for x in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3, abs=1e-5)
    wa, wb = _final_state(one)["model"], _final_state(two)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5)


def test_cuda_with_fewer_gpus_than_ranks(monkeypatch, capsys):
    """Two ranks on one GPU: --device cuda is a clear error, auto picks CPU (gloo)."""
    from flipkern.pretrain.cli import parse_args
    from flipkern.pretrain.train import setup_distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        parse_args(["--device", "cuda"])
    assert e.value.code == 2 and "2 ranks on this node need a GPU each" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # not started by torchrun: no process group
    assert setup_distributed("auto").device.type == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"),
    (["--mask-ratio", "1.0"], "--mask-ratio"),
    (["--precision", "fp8"], "--precision"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--steps", "2", "--unmasked-tune-steps", "3"], "--unmasked-tune-steps"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume"),
])
def test_bad_args_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flipkern-pretrain: error:") and message in err[-1]


def test_unreadable_data_exit_2(tmp_path, capsys):
    out = str(tmp_path / "run")
    for data, message in ((str(tmp_path / "nope.csv"), "no such file"),
                          (str(tmp_path / "shard-{000..003}.tar"), "no such file")):
        assert main(MICRO + ["--steps", "1", "--train-data", data, "--output-dir", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flipkern-pretrain: error:") and message in err[0]
    bad = tmp_path / "cols.csv"
    bad.write_text("a,b\nx.png,hello\n")
    assert main(MICRO + ["--steps", "1", "--train-data", str(bad), "--csv-separator", ",",
                         "--output-dir", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--csv-img-key" in err[0]
    # and as a real process: exit status 2, one line, no traceback
    r = subprocess.run([sys.executable, "-m", "flipkern.pretrain", "--train-data", str(tmp_path / "missing.tsv"),
                        "--output-dir", out], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flipkern-pretrain: error:"), r.stderr


def test_nan_guard_stops_with_a_clear_message(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "4", "--output-dir", out, "--debug-nan-step", "2"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 2" in err and "--skip-nonfinite" in err


def test_nan_guard_can_skip_steps(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "4", "--output-dir", out, "--debug-nan-step", "2", "--skip-nonfinite",
                         "--no-eval"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["skipped_nonfinite_steps"] == 1 and summary["steps"] == 4
    assert all(torch.isfinite(v).all() for v in _final_state(out)["model"].values())


def test_sigterm_checkpoints_and_exits_0(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "flipkern.pretrain", *MICRO, "--steps", "10000",
                             "--checkpoint-every", "0", "--debug-sleep", "0.05", "--output-dir", out],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(_train_records(out)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "received SIGTERM" in stdout
    ckpts = ckpt.list_checkpoints(out)
    assert len(ckpts) == 1 and 2 <= ckpts[0][0] < 10000
    assert ckpt.load(ckpts[0][1])["step"] == ckpts[0][0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "2", "--precision", precision, "--output-dir", out, "--no-eval"]) == 0
    state = _final_state(out)
    assert (state["scaler"] is not None) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _train_records(out))


def test_mask_schedule_and_accumulation(tmp_path):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "4", "--mask-ratio", "0.75", "--unmasked-tune-steps", "2", "--accum-steps", "2",
                         "--output-dir", out, "--no-eval"]) == 0
    assert [r["masked"] for r in _train_records(out)] == [True, True, False, False]
    assert _final_state(out)["data_step"] == 8
    out0 = str(tmp_path / "nomask")
    assert main(MICRO + ["--steps", "2", "--mask-ratio", "0", "--output-dir", out0, "--no-eval",
                         "--no-fast-path"]) == 0
    assert not any(r["masked"] for r in _train_records(out0))


def test_default_unmasked_tuning_is_the_last_fifth_of_the_steps(tmp_path):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "5", "--output-dir", out, "--no-eval"]) == 0
    assert [r["masked"] for r in _train_records(out)] == [True, True, True, True, False]
    assert _read_config(out)["args"]["unmasked_tune_steps"] == 1
    out0 = str(tmp_path / "nomask")
    assert main(MICRO + ["--steps", "5", "--mask-ratio", "0", "--output-dir", out0, "--no-eval"]) == 0
    assert _read_config(out0)["args"]["unmasked_tune_steps"] == 0


def test_default_warmup_is_a_tenth_of_a_short_run(tmp_path):
    i = MICRO.index("--warmup-steps")
    argv = MICRO[:i] + MICRO[i + 2:]
    out = str(tmp_path / "run")
    assert main(argv + ["--steps", "30", "--output-dir", out, "--no-eval", "--checkpoint-every", "0"]) == 0
    assert _read_config(out)["args"]["warmup_steps"] == 3
    lrs = [r["lr"] for r in _train_records(out)]
    assert lrs[2] == pytest.approx(1e-3) and lrs[1] < lrs[2]  # peak reached at the end of warmup


def test_trains_on_csv_with_bad_rows(tmp_path, capsys):
    from PIL import Image
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (20, 20), (20 * i, 255 - 20 * i, 100)).save(d / f"{i}.png")
        rows.append(f"{i}.png\tcolour number {i}")
    (d / "bad.png").write_bytes(b"garbage")
    rows += ["bad.png\ta corrupt image", "missing.png\tmissing", "0.png\t"]
    (d / "train.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "3", "--train-data", str(d / "train.tsv"), "--val-data", str(d / "train.tsv"),
                         "--output-dir", out]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["skipped_samples"] >= 2 + 2  # the index-time skips of train and val (+ corrupt decodes)
    assert "i2t_r@1" in summary["eval"] and "zeroshot_top1" not in summary["eval"]
    assert "skipped samples=" in capsys.readouterr().out
