import os

import pytest
import torch

import flipkern
from flipkern import backends


def usable_backends(implemented=backends.BACKENDS, device="cpu"):
    """Backends of ``implemented`` that can run on ``device`` tensors on this machine."""
    out = []
    for name in implemented:
        if not backends._runs_on(name, torch.device(device).type):
            continue
        if backends.backend_status(name)[0]:
            out.append(name)
    return out


def pytest_report_header(config):
    st = {n: s["usable"] for n, s in flipkern.info()["backends"].items()}
    return [f"flipkern backends usable: {st}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
