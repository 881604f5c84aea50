"""The package, the extension build and the backend machinery."""
import json
import os
import subprocess
import sys

import pytest
import torch

import flipkern as fk
from flipkern import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "flipkern.info", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data["backends"]) == set(backends.BACKENDS)
    assert data["torch"] == torch.__version__
    for name, st in data["backends"].items():
        assert st["why"], f"backend {name} has no reason given"


def _pytest_session(**env):
    """One fast test of this suite in a fresh pytest session, to see its conftest's backend
    gate; FLIPKERN_ALLOW_MISSING_BACKENDS only as given here."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_build.py::test_use_backend_rejects_unknown_name"]
    base = {k: v for k, v in os.environ.items() if k != "FLIPKERN_ALLOW_MISSING_BACKENDS"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**base, "TRITON_INTERPRET": "1", **env})


def test_session_fails_when_the_extension_did_not_build():
    # The README command once passed with 181 kernel cases silently gone (cpu missing).
    out = _pytest_session(FLIPKERN_NO_EXTENSION="1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "flipkern backends NOT tested" in out.stdout
    assert "cpu: C++ extension unavailable: FLIPKERN_NO_EXTENSION=1 [NOT ALLOWED]" in out.stdout
    allowed = _pytest_session(FLIPKERN_NO_EXTENSION="1", FLIPKERN_ALLOW_MISSING_BACKENDS="cpu,cuda")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "cpu: C++ extension unavailable: FLIPKERN_NO_EXTENSION=1 [allowed]" in allowed.stdout


def test_session_rejects_an_unknown_backend_name_to_allow():
    out = _pytest_session(FLIPKERN_ALLOW_MISSING_BACKENDS="cdua")
    assert out.returncode != 0
    assert "unknown backend(s) ['cdua']" in out.stdout + out.stderr


@pytest.mark.skipif(os.environ.get("FLIPKERN_CUDA") != "1", reason="FLIPKERN_CUDA=1 not set")
def test_cuda_kernels_compiled_and_linked():
    st = fk.info()
    assert st["cuda_kernels_compiled"], st["extension"]
    # The CUDA kernels are registered with the dispatcher even with no GPU to run them.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flipkern::drop_tokens", "CUDA")


def _cuobjdump():
    """cuobjdump of the CUDA toolkit, else the copy that Triton ships."""
    found = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        found.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((f for f in found if os.path.exists(f)), None)


@pytest.mark.skipif(os.environ.get("FLIPKERN_CUDA") != "1", reason="FLIPKERN_CUDA=1 not set")
def test_cuda_kernels_keep_their_state_in_registers():
    # Every CUDA C++ kernel, for each architecture built (sm_80 and sm_90 with no GPU to
    # ask), uses no local memory: no register spills and no stack arrays. Growing the
    # attention kernels' per-lane arrays (kMaxPerLane) or the opmath type then fails here,
    # on a CPU, not as a slow kernel on the first GPU.
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the kernels' resource usage")
    library = fk.info()["extension"].split()[-1]  # "prebuilt PATH" / "compiled on first use: PATH"
    dump = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True, timeout=300)
    assert dump.returncode == 0, dump.stderr
    arch, name, usage = None, None, []  # (arch, kernel, stack bytes, local bytes)
    for line in (ln.strip() for ln in dump.stdout.splitlines()):
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:"):
            fields = dict(f.split(":") for f in line.split())
            usage.append((arch, name, int(fields["STACK"]), int(fields["LOCAL"])))
    assert torch.cuda.is_available() or {"sm_80", "sm_90"} <= {u[0] for u in usage}, usage[:3]
    assert len(usage) >= 40, f"only {len(usage)} kernels in {library}"
    spilled = [u for u in usage if u[2] or u[3]]
    assert not spilled, f"kernels using local memory (arch, kernel, stack bytes, local bytes): {spilled}"


def test_import_without_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import flipkern as fk\n"
        "    x = torch.randn(2, 5, 3); ids = torch.tensor([[0, 4], [1, 2]])\n"
        "    a = fk.drop_tokens(x, ids); b = fk.drop_tokens(x, ids)\n"
        "msgs = [str(m.message) for m in w if 'flipkern' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'reference' in msgs[0], msgs\n"
        "assert fk.backends_used()['drop_tokens'] == 'reference'\n"
        "print('ok')\n"
    )
    out = _run(code, FLIPKERN_NO_EXTENSION="1")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with fk.use_backend("fortran"):
            pass


def test_forcing_a_backend_that_cannot_run_is_an_error():
    x, ids = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 2]])
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        with fk.use_backend("cuda"):
            fk.drop_tokens(x, ids)


def test_default_backend_follows_device():
    x, ids = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 2]])
    fk.drop_tokens(x, ids)
    expected = "cpu" if backends.backend_status("cpu")[0] else "reference"
    assert fk.backends_used()["drop_tokens"] == expected
    with fk.use_backend("reference"):
        fk.drop_tokens(x, ids)
    assert fk.backends_used()["drop_tokens"] == "reference"


def test_reference_is_the_installed_subpackage():
    import flipkern.reference as ref
    assert ref.__name__ == "flipkern.reference"
    assert hasattr(ref, "masking")


def test_info_function_survives_the_info_command_module():
    # flipkern.info() is a function; importing the code behind `python -m flipkern.info`
    # must not replace it with a module (it did once, the second time info() was called).
    assert callable(fk.info) and fk.info()["torch"] == torch.__version__
    assert callable(fk.info) and fk.info()["torch"] == torch.__version__
