"""Training faults around checkpoints (issue 16): a damaged latest checkpoint falls back
to the previous one, a SIGKILL while a checkpoint is written never leaves the run
unresumable, a full disk keeps the previous checkpoint and stops with a clear error."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_pretrain import MICRO, ROOT, _env

from flipkern.pretrain import checkpoint as ckpt
from flipkern.pretrain.cli import main


def _save(out, step, size=1000):
    path = ckpt.checkpoint_path(out, step)
    ckpt.atomic_save({"step": step, "w": torch.full((size,), float(step))}, path)
    return path


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: only the CRC-32 can tell
    open(path, "wb").write(data)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
    out = str(tmp_path)
    good = _save(out, 1)
    bad = _save(out, 2)
    damage(bad)
    assert ckpt.latest_checkpoint(out) == good
    err = capsys.readouterr().err
    assert f"checkpoint {bad} is damaged" in err and "falling back to the previous one" in err
    assert ckpt.load(ckpt.latest_checkpoint(out))["step"] == 1


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    out = str(tmp_path)
    _truncate(_save(out, 1))
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        ckpt.latest_checkpoint(out)


def test_training_resumes_from_the_previous_checkpoint_when_the_latest_is_truncated(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = MICRO + ["--output-dir", out, "--checkpoint-every", "1", "--keep-checkpoints", "2", "--no-eval"]
    assert main(argv + ["--steps", "3"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3]
    _truncate(ckpt.checkpoint_path(out, 3))
    capsys.readouterr()
    assert main(argv + ["--steps", "4"]) == 0  # auto-resume
    captured = capsys.readouterr()
    assert "is damaged" in captured.err and "falling back" in captured.err
    assert "resumed from" in captured.out + captured.err and "at step 2" in captured.out + captured.err
    assert ckpt.load(ckpt.latest_checkpoint(out))["step"] == 4


# ----------------------------------------------------------------------------- SIGKILL

_WRITER = """
import sys, torch
from flipkern.pretrain import checkpoint as ckpt
out, step = sys.argv[1], int(sys.argv[2])
while True:
    step += 1
    ckpt.atomic_save({"step": step, "w": torch.full((2_000_000,), float(step))}, ckpt.checkpoint_path(out, step))
    ckpt.prune(out, 2)
    print(step, flush=True)
"""


def test_sigkill_while_writing_never_leaves_the_run_unresumable(tmp_path):
    """A writer of 8 MB checkpoints (keep-last-2) is SIGKILLed at 4 random moments; after
    each, the newest intact checkpoint loads and holds the step it is named for. The seed
    is fixed: the same moments every run (their place within a write still varies)."""
    out = str(tmp_path)
    rng = random.Random(0)
    step, kills_mid_write = 0, 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, out, str(step)], cwd=ROOT, env=_env(),
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # one checkpoint written: the writer is in its loop
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        d = ckpt.checkpoint_dir(out)
        kills_mid_write += any(name.startswith(".step_") for name in os.listdir(d))
        path = ckpt.latest_checkpoint(out)
        assert path is not None
        state = ckpt.load(path)
        step = state["step"]
        assert os.path.basename(path) == f"step_{step:08d}.pt"
        assert torch.equal(state["w"], torch.full((2_000_000,), float(step)))
    ckpt.prune(out, 2)  # the next save's prune removes what killed writers left behind
    assert not [n for n in os.listdir(ckpt.checkpoint_dir(out)) if n.startswith(".step_")]
    print(f"{kills_mid_write} of 4 kills landed mid-write")


# ----------------------------------------------------------------------------- full disk

def _full_disk_save(obj, f):
    """What torch.save does on a full disk (seen on a 1 MiB tmpfs): part of the archive is
    written, the write fails with ENOSPC, and torch's zip writer reports that as a
    RuntimeError raised while handling the OSError."""
    f.write(b"PK\x03\x04" + b"\0" * 4096)
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    out = str(tmp_path)
    previous = _save(out, 1)
    before = open(previous, "rb").read()
    monkeypatch.setattr(torch, "save", _full_disk_save)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(out, 2)
    message = str(info.value)
    assert "No space left on device" in message and f"the previous checkpoint {previous} is intact" in message
    monkeypatch.undo()
    assert open(previous, "rb").read() == before
    assert os.listdir(ckpt.checkpoint_dir(out)) == [os.path.basename(previous)]  # no temporary left
    assert ckpt.latest_checkpoint(out) == previous


def test_full_disk_at_fsync_is_reported_too(tmp_path, monkeypatch):
    out = str(tmp_path)
    previous = _save(out, 1)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint .* is intact"):
        _save(out, 2)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(out) == previous


def test_training_stops_with_one_error_line_when_the_disk_fills(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def save_then_fill(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) >= 2:
            return _full_disk_save(obj, f)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_fill)
    argv = MICRO + ["--output-dir", out, "--checkpoint-every", "1", "--no-eval"]
    assert main(argv + ["--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "flipkern-pretrain: error: cannot write checkpoint" in err and "No space left on device" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert main(argv + ["--steps", "3"]) == 0  # room again: resumes from step 1 and finishes


def test_a_real_full_tmpfs(tmp_path):
    """The same on a real 1 MiB tmpfs, where the machine lets us mount one (root with
    CAP_SYS_ADMIN); elsewhere the monkeypatched tests above stand in for it."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        out = str(mnt)
        previous = _save(out, 1, size=1000)  # 4 KB
        before = open(previous, "rb").read()
        with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
            _save(out, 2, size=1_000_000)  # 4 MB
        assert open(previous, "rb").read() == before
        assert os.listdir(ckpt.checkpoint_dir(out)) == [os.path.basename(previous)]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
