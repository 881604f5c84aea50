"""Checkpoints: atomic writes, keep-last-N, finding the latest one.

Layout: ``<output_dir>/checkpoints/step_00000123.pt``. A checkpoint is written
to a temporary file in the same directory, flushed and fsynced, then moved into
place with ``os.replace``, so a crash mid-write never leaves a truncated
checkpoint under the final name.
"""
import os
import random
import re

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


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


def latest_checkpoint(output_dir):
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


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


def prune(output_dir, keep):
    """Delete all but the newest ``keep`` checkpoints (keep <= 0: keep all)."""
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
