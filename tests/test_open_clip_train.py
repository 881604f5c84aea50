"""The flipkern open_clip_train command against stock open_clip_train, end to end on CPU.

A tiny open_clip config (a local-dir: model, no weights downloaded) trains 4 steps on a
CSV of 16 generated images with --force-patch-dropout 0.5, each run in its own process
(tests/_open_clip_train_run.py records every loss at full precision). Both commands draw
the same kept patches: the patched vision tower makes PatchDropout's own draw
(torch.randn(B, N).topk(K) on the default generator, in the same order) and open_clip_train
seeds that generator the same way, so with --workers 0 (augmentation in the main process)
the two runs see the same images, captions and masks. Losses follow the tolerance rule:
flipkern fp32 vs stock float64, bounded by stock fp32's own error.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from _tolerance import assert_close_to_reference

pytest.importorskip("open_clip_train.main", reason="open_clip_train needs open_clip_torch[training] "
                    "(webdataset, pandas)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "_open_clip_train_run.py")
STEPS = 4  # of one process; 2 ranks take 2 steps of 2 x BATCH
BATCH = 4
REPORT_MODEL = "(2 of 2 towers on flipkern): visual: flipkern; text: flipkern"
REPORT_LOSS = "loss {} (world size {}): loss: flipkern"


def _write_tiny_dataset(root):
    """A tiny open_clip config (16 patches, 16-token context) and a CSV of 16 random images
    whose captions range from 1 word to longer than the context (truncated at 16 tokens)."""
    import numpy as np
    from PIL import Image
    model_dir = root / "model"
    model_dir.mkdir()
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    rng = np.random.default_rng(0)
    words = "a photo of the red green blue small large circle square triangle on textured background".split()
    rows = ["filepath\ttitle"]
    for i in range(STEPS * BATCH):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(f"{path}\t{' '.join(rng.choice(words, 1 + (i * 7) % 20))}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return f"local-dir:{model_dir}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip_train")
    model = _write_tiny_dataset(root)
    args = ["--train-data", str(root / "train.csv"), "--dataset-type", "csv", "--model", model,
            "--device", "cpu", "--precision", "fp32", "--batch-size", str(BATCH), "--workers", "0",
            "--force-patch-dropout", "0.5", "--seed", "0", "--lr", "1e-3", "--warmup", "1",
            "--log-every-n-steps", "1", "--report-to", "none", "--val-data", str(root / "train.csv")]
    return root, args  # logs go to <root>/logs (the default ./logs of runs in root): torchrun's
    # own parser refuses a --logs argument (an ambiguous prefix of its --logs-specs)


def _env():
    # one thread per process: the same arithmetic on every machine, and no oversubscription
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
            "OMP_NUM_THREADS": "1"}


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def train(workdir, name, mode, dtype="float32", *extra, ranks=1):
    """One run of the driver (under torchrun, gloo, when ranks > 1).

    Returns (losses of rank 0 or, with ranks > 1, [losses of each rank], the run's out.log,
    the console output of all ranks)."""
    root, args = workdir
    record = root / f"{name}.json"
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(ranks)]
    proc = subprocess.run([*launch, DRIVER, str(record), mode, dtype, *args, "--name", name, *extra],
                          env=_env(), cwd=root, capture_output=True, text=True, timeout=600)
    _check(proc, f"{mode} {dtype} run {name} on {ranks} rank(s)")
    losses = [json.loads((root / f"{name}.json.rank{r}").read_text()) for r in range(ranks)]
    log = (root / "logs" / name / "out.log").read_text()
    return (losses[0] if ranks == 1 else losses), log, proc.stdout + proc.stderr


def checkpoint(workdir, name, epoch=1):
    return workdir[0] / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt"


@pytest.fixture(scope="module")
def first_epoch(workdir):
    """One epoch of stock float64 (the reference), stock fp32 and flipkern fp32."""
    return {name: train(workdir, name, mode, dtype, "--epochs", "1")
            for name, mode, dtype in (("stock64", "stock", "float64"), ("stock32", "stock", "float32"),
                                      ("flipkern32", "flipkern", "float32"))}


def assert_losses_follow_the_rule(out, ref64, ref_lowp, name, steps=STEPS):
    """out and ref_lowp: the loss values of flipkern and stock in the same (lower) precision."""
    assert len(out) == len(ref64) == len(ref_lowp) == steps, (out, ref64, ref_lowp)
    assert_close_to_reference(torch.tensor(out, dtype=torch.float32), torch.tensor(ref64, dtype=torch.float64),
                              torch.tensor(ref_lowp, dtype=torch.float32), name=name)


def test_flipkern_command_gives_stock_losses_and_logs_its_report(first_epoch):
    (ref64, _, _), (ref32, stock_log, _), (out, log, _) = (first_epoch[n] for n in ("stock64", "stock32", "flipkern32"))
    assert_losses_follow_the_rule(out, ref64, ref32, "losses of 4 steps, patch dropout 0.5")
    assert log.count(REPORT_MODEL) == 1 and log.count(REPORT_LOSS.format("ClipLoss", 1)) == 1, log[-3000:]
    assert "flipkern:" not in stock_log
    # open_clip_train's validation after the epoch, on the patched model in eval mode (no dropout)
    val, stock_val = (_val_metrics(text) for text in (log, stock_log))
    assert val.keys() == stock_val.keys() and "clip_val_loss" in val
    for k in val:  # the log rounds to 4 decimals: equal within that, plus fp32 slack
        assert abs(val[k] - stock_val[k]) <= 1.5e-4 * max(1.0, abs(stock_val[k])), (k, val[k], stock_val[k])


def _val_metrics(log):
    """open_clip_train's final 'Eval Epoch: N name: value<TAB>...' line as {name: value}."""
    line = [line for line in log.splitlines() if "Eval Epoch:" in line and "clip_val_loss" in line][-1]
    items = line.split("Eval Epoch: ", 1)[1].split(" ", 1)[1].split("\t")
    return {k: float(v) for k, v in (item.split(": ") for item in items)}


def test_amp_bf16_losses(workdir, first_epoch):
    """--precision amp_bf16 (CPU autocast to bfloat16): flipkern vs stock amp_bf16 and float64."""
    ref32, _, _ = train(workdir, "stock_amp_bf16", "stock", "float32", "--epochs", "1", "--precision", "amp_bf16")
    out, _, _ = train(workdir, "flipkern_amp_bf16", "flipkern", "float32", "--epochs", "1", "--precision", "amp_bf16")
    assert_losses_follow_the_rule(out, first_epoch["stock64"][0], ref32, "amp_bf16 losses")


def test_checkpoints_resume_across_the_two_commands(workdir, first_epoch):
    stock, flip = (torch.load(checkpoint(workdir, n), map_location="cpu") for n in ("stock32", "flipkern32"))
    assert list(flip["state_dict"]) == list(stock["state_dict"])
    assert all(flip["state_dict"][k].shape == v.shape for k, v in stock["state_dict"].items())
    # epoch 2 from stock's checkpoint: flipkern vs stock fp32 and stock float64, all resumed from it
    resume = ("--epochs", "2", "--resume", str(checkpoint(workdir, "stock32")))
    ref64, _, _ = train(workdir, "stock64_from_stock", "stock", "float64", *resume)
    ref32, _, _ = train(workdir, "stock32_from_stock", "stock", "float32", *resume)
    out, log, _ = train(workdir, "flipkern32_from_stock", "flipkern", "float32", *resume)
    assert "=> resuming checkpoint" in log and "(epoch 1)" in log
    assert_losses_follow_the_rule(out, ref64, ref32, "epoch 2 losses, flipkern resumed from stock")
    # and stock resumes flipkern's checkpoint
    back, log, _ = train(workdir, "stock32_from_flipkern", "stock", "float32", "--epochs", "2",
                      "--resume", str(checkpoint(workdir, "flipkern32")))
    assert "=> resuming checkpoint" in log and len(back) == STEPS and all(map(torch.isfinite, torch.tensor(back)))
    assert checkpoint(workdir, "stock32_from_flipkern", epoch=2).exists()


TORCHRUN_CASES = {
    # ClipLoss in the setting the flipkern loss covers, 2 steps per rank accumulated into one
    # optimizer step, with gradient checkpointing
    "clip": ("--local-loss", "--gather-with-grad", "--accum-freq", "2", "--grad-checkpointing"),
    # SigLipLoss: open_clip exchanges texts between neighbour ranks, flipkern all-gathers them
    "siglip": ("--siglip",),
}


@pytest.mark.parametrize("case", list(TORCHRUN_CASES))
def test_two_ranks_under_torchrun_gloo(workdir, case):
    """2 ranks x batch 4 (2 steps each): the flipkern loss runs over the process group;
    the losses of each rank by the rule, the report logged once."""
    dist = ("--dist-backend", "gloo", "--epochs", "1", *TORCHRUN_CASES[case])
    ref64, _, _ = train(workdir, f"torchrun_{case}_stock64", "stock", "float64", *dist, ranks=2)
    ref32, _, _ = train(workdir, f"torchrun_{case}_stock32", "stock", "float32", *dist, ranks=2)
    out, log, console = train(workdir, f"torchrun_{case}_flipkern32", "flipkern", "float32", *dist, ranks=2)
    for rank in range(2):
        assert_losses_follow_the_rule(out[rank], ref64[rank], ref32[rank], f"{case} rank {rank}", steps=STEPS // 2)
    assert "total 2" in log  # open_clip_train's own "Running in distributed mode ... total 2"
    # rank 0 only: once in the log and once on the console of both ranks together
    report_loss = REPORT_LOSS.format("SigLipLoss" if case == "siglip" else "ClipLoss", 2)
    for text in (log, console):
        assert text.count(REPORT_MODEL) == 1 and text.count(report_loss) == 1, text[-3000:]
    assert checkpoint(workdir, f"torchrun_{case}_flipkern32").exists()


def test_install_fails_loudly_when_open_clip_train_moved(monkeypatch):
    import open_clip_train.main as train_main

    from flipkern import open_clip_train
    monkeypatch.delattr(train_main, "create_loss")
    with pytest.raises(RuntimeError, match="no longer uses create_loss"):
        open_clip_train.install()


def test_the_benchmark_reads_the_samples_per_second_open_clip_train_logs(first_epoch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_open_clip_train import samples_per_s
    for name, (_, log, _) in first_epoch.items():
        values = samples_per_s(log)
        assert len(values) == STEPS and all(v > 0 for v in values), (name, values)


def test_uncovered_parts_run_stock_and_are_reported(caplog):
    """What the patch does not cover is logged as stock open_clip with the reason, never an error."""
    import argparse
    import logging

    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP

    from flipkern.open_clip_train import _patched_loss_factory, _patched_model_factory
    caplog.set_level(logging.INFO)
    model = CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=64, head_width=32, image_size=32, patch_size=8,
                                               attentional_pool=True),
                 text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=2, layers=1))
    create = _patched_model_factory(lambda name, *a, **k: (model, "train", "val"))
    assert create("tiny-attn-pool") == (model, "train", "val")
    assert create("tiny-jit", jit=True)[0] is model
    # a 2-rank ClipLoss without local_loss and gather_with_grad: open_clip's own loss math
    loss = _patched_loss_factory(lambda args: ClipLoss(rank=0, world_size=2))(argparse.Namespace(world_size=2))
    assert "forward" not in vars(loss)
    assert ("model 'tiny-attn-pool' (1 of 2 towers on flipkern): visual: stock open_clip "
            "(attentional pooling is not covered); text: flipkern") in caplog.text
    assert "model 'tiny-jit': stock open_clip (a TorchScript model (--torchscript) is not patched)" in caplog.text
    assert ("loss ClipLoss (world size 2): loss: stock open_clip (a multi-rank ClipLoss needs "
            "local_loss=True and gather_with_grad=True)") in caplog.text
