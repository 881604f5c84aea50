"""Checkpoints: atomic writes, keep-last-N, finding the latest intact one.

Layout: ``<output_dir>/checkpoints/step_00000123.pt``. A checkpoint is written
to a temporary file in the same directory, flushed and fsynced, then moved into
place with ``os.replace``, so a crash mid-write never leaves a truncated
checkpoint under the final name, and the previous ones are pruned only after the
new one is in place. A write that fails (a full disk) removes its temporary file,
leaves the previous checkpoints as they were and stops the run with one error
line. Resuming takes the newest checkpoint that reads back intact (every member
of torch.save's zip archive passes its CRC-32), so a checkpoint truncated or
corrupted later (a copy cut short, a bad disk) falls back to the previous one,
with a message.
"""
import errno
import os
import random
import re
import sys
import zipfile

import numpy as np
import torch

from .cli import PROG, CLIError

_NAME = re.compile(r"^step_(\d+)\.pt$")
_TEMPORARY = re.compile(r"^\.step_\d+\.pt\.tmp\.(\d+)$")


class CheckpointError(CLIError):
    """A checkpoint that cannot be written or resumed from: one error line, as CLIError."""


def checkpoint_dir(output_dir):
    return os.path.join(output_dir, "checkpoints")


def checkpoint_path(output_dir, step):
    return os.path.join(checkpoint_dir(output_dir), f"step_{step:08d}.pt")


def list_checkpoints(output_dir):
    """[(step, path)] of complete checkpoints, oldest first."""
    d = checkpoint_dir(output_dir)
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(d, name)))
    return sorted(out)


def damage(path):
    """Why ``path`` is not an intact checkpoint (a string), or None when it is.

    torch.save writes a zip archive whose members carry CRC-32s: a truncated file has no
    central directory, a corrupted one fails a CRC. Reads the file once; unpickles nothing.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None if bad is None else f"member {bad} fails its CRC-32 check"


def latest_checkpoint(output_dir):
    """Path of the newest intact checkpoint, or None when there is none.

    A damaged newer one is reported on stderr and skipped. If checkpoints exist but none
    is intact, that is an error rather than a fresh start that would overwrite the run.
    """
    ckpts = list_checkpoints(output_dir)
    for step, path in reversed(ckpts):
        why = damage(path)
        if why is None:
            return path
        print(f"{PROG}: checkpoint {path} is damaged ({why}); falling back to the previous one",
              file=sys.stderr, flush=True)
    if ckpts:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(output_dir)}: all {len(ckpts)} are "
                              f"damaged (see above); move them away to start afresh")
    return None


def _os_error(exc):
    """The OSError behind ``exc``: torch.save reports a failed write of its zip writer as a
    RuntimeError ("unexpected pos ...") raised while handling the OSError."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def atomic_save(obj, path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:  # not an I/O failure (e.g. something unpicklable): not ours to explain
            raise
        previous = [p for _, p in list_checkpoints(os.path.dirname(d)) if p != path]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        hint = "; free some space" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}; {kept}{hint}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename durable too
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphaned_temporaries(output_dir):
    """Delete the temporary files of writers that died mid-write (a SIGKILL)."""
    d = checkpoint_dir(output_dir)
    for name in os.listdir(d) if os.path.isdir(d) else []:
        m = _TEMPORARY.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(d, name))
            except FileNotFoundError:
                pass


def prune(output_dir, keep):
    """Delete all but the newest ``keep`` checkpoints (keep <= 0: keep all), and the
    temporary files of writers killed mid-write."""
    remove_orphaned_temporaries(output_dir)
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def rng_state():
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # a different number of GPUs: leave them seeded
            pass


def load(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
