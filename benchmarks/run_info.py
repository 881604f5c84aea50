"""What every benchmark JSON records about the run: machine, threads, commit, torch, load."""
import os
import platform
import subprocess
import sys

import torch


def _commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _command():
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith(os.path.join("pytest", "__main__.py")):
        return ["python -m pytest"] + sys.argv[1:]
    return ["python " + os.path.relpath(argv0) if argv0 else "python"] + sys.argv[1:]


def run_info():
    """A dict for the JSON's "run" field; loadavg_start here, the caller adds loadavg_end."""
    info = dict(command=" ".join(_command()),
                machine=dict(cpu=cpu_name(), cores=os.cpu_count(), system=platform.system(),
                             python=platform.python_version()),
                torch=torch.__version__, threads=torch.get_num_threads(), commit=_commit(),
                loadavg_start=load_average())
    if torch.cuda.is_available():
        info["machine"]["gpu"] = torch.cuda.get_device_name(0)
    return info
