"""The pretraining job on a micro configuration (a few steps, seconds each):
resume == uninterrupted, 2 processes == 1 process, error exits, the NaN guard,
SIGTERM checkpointing, output files, precisions and masking schedules."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from flipkern.pretrain import build, progress, train
from flipkern.pretrain import checkpoint as ckpt
from flipkern.pretrain.cli import build_parser, main, parse_args
from flipkern.pretrain.errors import CLIError
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


def run_one_and_two_processes(tmp_path, args, timeout):
    """``flipkern-pretrain args`` in this process and as 2 ranks under torchrun (gloo on CPU);
    their output dirs (one, two)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(args + ["--output-dir", one]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flipkern.pretrain", *args, "--output-dir", two]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return one, two


def assert_same_trajectory(one, two, parts):
    """The runs' losses, grad norms and final states of ``parts`` agree to the tolerance of a
    different reduction order (two ranks sum the batch in two halves)."""
    ra, rb = _train_records(one), _train_records(two)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3, abs=1e-5)
    sa, sb = _final_state(one), _final_state(two)
    for part in parts:
        for k in sa[part]:
            torch.testing.assert_close(sa[part][k], sb[part][k], rtol=1e-3, atol=1e-5, msg=f"{part}.{k}")


def test_outputs_and_summary(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(MICRO + ["--steps", "3", "--output-dir", out, "--checkpoint-every", "1", "--keep-checkpoints", "2",
                         "--eval-every", "2"]) == 0
    stdout = capsys.readouterr().out
    line = [ln for ln in stdout.splitlines() if "done:" in ln][-1]
    assert "steps=3" in line and "img/s=" in line and "zero-shot top-1=" in line and "backends" in line
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["args"]["steps"] == 3 and cfg["num_patches"] == 16 and cfg["num_keep"] == 8
    assert cfg["args"]["precision"] == "fp32"  # the CPU default
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
    assert 0 < summary["train_cpu_s"]  # the steps' CPU seconds (benchmarks on a shared machine read them)


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
    one, two = run_one_and_two_processes(tmp_path, common, timeout=900)
    assert json.load(open(os.path.join(two, "config.json")))["world_size"] == 2
    assert [x["step"] for x in _train_records(one)] == [x["step"] for x in _train_records(two)]
    assert_same_trajectory(one, two, parts=("model",))


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


# ----------------------------------------------------------------------------- the loop's steps, one at a time

def _built(out, *extra):
    """A Run of the micro configuration, as run() builds it (one CPU process)."""
    args = parse_args(MICRO + ["--output-dir", out, *extra])
    train.resolve_defaults(args)
    args.precision = build.resolve_precision(args.precision, torch.device("cpu"))
    return train.build(args, build.DistInfo())


def _first_step(run):
    """train_step on the run's first batches; the restored state and the result."""
    state = train.restore(run)
    train.write_config(run)
    it = iter(train.make_loader(run, state.step))
    result = train.train_step(run, [next(it) for _ in range(run.args.accum_steps)], state.step)
    state.step += 1
    return state, result


def test_train_step_alone_is_the_first_step_of_a_run(tmp_path):
    whole, alone = str(tmp_path / "whole"), str(tmp_path / "alone")
    assert main(MICRO + ["--steps", "3", "--accum-steps", "2", "--no-eval", "--output-dir", whole]) == 0
    run = _built(alone, "--steps", "3", "--accum-steps", "2")
    before = [p.detach().clone() for p in run.model.parameters()]
    state, result = _first_step(run)
    first = _train_records(whole)[0]
    assert (result.loss, result.lr, result.grad_norm, result.masked) == (
        first["loss"], first["lr"], first["grad_norm"], first["masked"])  # bit-exact
    assert not result.nonfinite and state.step == 1
    assert all(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()))
    assert run.sched.get_last_lr()[0] > result.lr  # warmup advanced


def _split_batch(batch, parts):
    """A loader batch as ``parts`` loader batches of its consecutive samples (masks included)."""
    ids = batch["ids_keep"].chunk(parts) if batch["ids_keep"] is not None else [None] * parts
    return [dict(images=i, tokens=t, ids_keep=k) for i, t, k in
            zip(batch["images"].chunk(parts), batch["tokens"].chunk(parts), ids)]


def test_accum_steps_is_one_step_on_the_whole_contrastive_batch(tmp_path):
    """--batch-size 4 --accum-steps 4 == --batch-size 16: same samples and masks, same loss and
    gradient (fp32 here; float64 and 2 processes: test_accumulate)."""
    big = _built(str(tmp_path / "big"), "--steps", "2", "--batch-size", "16")
    accum = _built(str(tmp_path / "accum"), "--steps", "2", "--batch-size", "4", "--accum-steps", "4",
                   "--grad-checkpointing")
    batch = next(iter(train.make_loader(big, 0)))
    want = train.train_step(big, [batch], 0)
    got = train.train_step(accum, _split_batch(batch, 4), 0)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    assert accum.model.visual.grad_checkpointing and accum.model.text.grad_checkpointing
    assert accum.config is None and train.contrastive_batch(accum.args) == 16


def test_resume_with_accumulation_and_checkpointing_is_bit_exact(tmp_path, capsys):
    common = MICRO + ["--steps", "4", "--accum-steps", "2", "--grad-checkpointing", "--checkpoint-every", "2",
                      "--keep-checkpoints", "0", "--no-eval"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--output-dir", a]) == 0
    assert "contrastive batch=16" in capsys.readouterr().out  # the summary line: 8 x 2
    assert json.load(open(os.path.join(a, "summary.json")))["contrastive_batch"] == 16
    assert main(common + ["--output-dir", b, "--debug-stop-after", "3"]) == 0
    assert main(common + ["--output-dir", b]) == 0  # resumes from step 2
    assert _train_records(a) == _train_records(b)
    sa, sb = _final_state(a), _final_state(b)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_save_checkpoint_then_restore_alone(tmp_path):
    out = str(tmp_path / "run")
    run = _built(out, "--steps", "3")
    state, _ = _first_step(run)
    run.metrics.write(dict(type="train", step=2, loss=0.0))  # a record of a step a resume redoes
    path = train.save_checkpoint(run, state)
    assert path == ckpt.latest_checkpoint(out) and ckpt.load(path)["step"] == 1
    again = _built(out, "--steps", "3")
    restored = train.restore(again)
    assert (restored.start_step, restored.step) == (1, 1)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert again.sched.get_last_lr() == run.sched.get_last_lr()
    assert read_metrics(run.metrics.path) == []  # step 2's record dropped
    with pytest.raises(CLIError, match="--accum-steps"):
        train.restore(_built(out, "--steps", "3", "--accum-steps", "2"))


def test_evaluate_now_and_summarize_alone(tmp_path, capsys):
    out = str(tmp_path / "run")
    run = _built(out, "--steps", "3")
    res = train.evaluate_now(run, 0)
    assert 0 <= res["zeroshot_top1"] <= 1 and res["eval_samples"] == 16
    assert _eval_records(out) == [dict(type="eval", step=0, **res)]
    state = train.LoopState(step=3, train_time=2.0, samples_seen=24)
    summary = train.summarize(run, state, res)
    assert summary["img_per_s"] == 12.0 and summary["trained_steps"] == 3 and summary["eval"] == res
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 3
    assert "steps=3" in capsys.readouterr().out
    assert train.evaluate_now(_built(out, "--steps", "3", "--no-eval"), 0) is None


def test_mask_schedule():
    schedule = train.MaskSchedule(num_keep=8, accum_steps=2, unmasked_from=3)  # data steps = 2 x optimizer steps
    assert [schedule(s) for s in range(8)] == [8] * 6 + [None] * 2


# ----------------------------------------------------------------------------- progress, help, precision

_PROGRESS_LINE = re.compile(r"^flipkern-pretrain: step (\d+)/5 \(\d+%\) loss \d+\.\d{4} lr \d\.\d{3}e[-+]\d\d "
                            r"img/s \d+\.\d eta \d+:\d\d:\d\d$")


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    argv = [a for a in MICRO if a != "--no-progress"]
    i = argv.index("--log-every")
    argv[i + 1] = "2"
    assert main(argv + ["--steps", "5", "--no-eval", "--output-dir", str(tmp_path / "a")]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("flipkern-pretrain: step")]
    assert [int(_PROGRESS_LINE.match(ln).group(1)) for ln in lines] == [1, 2, 4, 5], lines
    assert lines[-1].endswith("eta 0:00:00")
    assert main(argv + ["--steps", "2", "--no-eval", "--no-progress", "--output-dir", str(tmp_path / "b")]) == 0
    assert "flipkern-pretrain: step" not in capsys.readouterr().err


def test_progress_mode():
    assert progress.progress_mode(True, True, stderr_is_tty=True) == "bar"
    assert progress.progress_mode(True, True, stderr_is_tty=False) == "lines"
    assert progress.progress_mode(False, True, stderr_is_tty=False) is None  # --no-progress
    assert progress.progress_mode(True, False, stderr_is_tty=False) is None  # not rank 0


def test_model_override_help_example_parses():
    action = next(a for a in build_parser()._actions if a.dest == "model_override")
    example = re.search(r"--model-override (\S+)", action.help).group(1)
    args = parse_args(["--model-override", example])
    key, value = example.split("=")
    assert getattr(build.model_config(args).vision, key.split(".")[1]) == int(value)
    with pytest.raises(CLIError, match="--model-override vision_width"):  # the old example's form
        build.model_config(parse_args(["--model-override", "vision_width=128"]))


def test_default_precision_is_bf16_on_cuda_fp32_on_cpu():
    assert parse_args([]).precision is None
    assert build.resolve_precision(None, torch.device("cpu")) == "fp32"
    assert build.resolve_precision(None, torch.device("cuda", 0)) == "bf16"
    for explicit in ("fp32", "bf16", "fp16"):
        for device in (torch.device("cpu"), torch.device("cuda", 0)):
            assert build.resolve_precision(explicit, device) == explicit
    action = next(a for a in build_parser()._actions if a.dest == "precision")
    assert "bf16 on a CUDA device" in action.help and "fp32 on CPU" in action.help


def test_help_says_the_contrastive_batch_is_batch_size_times_accum_steps():
    actions = {a.dest: a for a in build_parser()._actions}
    assert "contrastive batch is --batch-size x --accum-steps" in actions["batch_size"].help
    assert "full-batch negatives" in actions["accum_steps"].help
    assert "both towers" in actions["grad_checkpointing"].help
