import os

import pytest
import torch

import flipkern
from flipkern import backends

# FLIPKERN_ALLOW_MISSING_BACKENDS=cuda,triton: the backends this session may leave untested.
# Unset: only cuda, and only on a machine with no CUDA device (the README's CPU test command).
# Any other backend that cannot run here (the C++ extension failed to build: cpu; Triton
# not importable or TRITON_INTERPRET unset on a CPU: triton) fails the session, so its
# tests can never vanish silently.
ALLOW_ENV = "FLIPKERN_ALLOW_MISSING_BACKENDS"


def usable_backends(implemented=backends.BACKENDS, device="cpu"):
    """Backends of ``implemented`` that can run on ``device`` tensors on this machine."""
    out = []
    for name in implemented:
        if not backends._runs_on(name, torch.device(device).type):
            continue
        if backends.backend_status(name)[0]:
            out.append(name)
    return out


def missing_backends():
    """{backend: why} for every backend that cannot run here."""
    status = {name: backends.backend_status(name) for name in backends.BACKENDS}
    return {name: why for name, (usable, why) in status.items() if not usable}


def allowed_missing():
    """The backends that may be missing, and where that rule comes from."""
    value = os.environ.get(ALLOW_ENV)
    if value is None:
        if torch.cuda.is_available():
            return set(), f"{ALLOW_ENV} unset, a CUDA device present: every backend required"
        return {"cuda"}, f"{ALLOW_ENV} unset and no CUDA device: cuda may be missing"
    names = {n.strip() for n in value.split(",") if n.strip()}
    unknown = names - set(backends.BACKENDS)
    if unknown:
        raise pytest.UsageError(f"{ALLOW_ENV}={value!r}: unknown backend(s) {sorted(unknown)}; "
                                f"choose from {backends.BACKENDS}")
    return names, f"{ALLOW_ENV}={value}"


def pytest_configure(config):
    allowed_missing()  # a misspelled backend name stops the session before it runs


def pytest_report_header(config):
    st = {n: s["usable"] for n, s in flipkern.info()["backends"].items()}
    return [f"flipkern backends usable: {st}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


def _unallowed(missing):
    allowed, _ = allowed_missing()
    return sorted(set(missing) - allowed)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.OK and _unallowed(missing_backends()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    missing = missing_backends()
    if not missing:
        return
    bad = _unallowed(missing)
    _, rule = allowed_missing()
    terminalreporter.section("flipkern backends NOT tested", sep="=", red=bool(bad), yellow=not bad, bold=True)
    for name, why in missing.items():
        verdict = "NOT ALLOWED" if name in bad else "allowed"
        terminalreporter.line(f"{name}: {why} [{verdict}]", red=name in bad)
    terminalreporter.line(f"rule: {rule}")
    if bad:
        terminalreporter.line(f"the session FAILS: its tests of {', '.join(bad)} did not run. Fix the cause above, "
                              f"or allow it explicitly: {ALLOW_ENV}={','.join(sorted(missing))}", red=True, bold=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
