"""`python -m pipeline env` (`make env`): what a bug report needs, as plain text to paste into it.

Python, OS, CPU count and memory, the accelerators torch sees (CUDA devices with their memory, MPS), the
CUDA/cuDNN versions torch was built with, and the versions of the libraries the pipeline stands on, read from
the installed packages' metadata (`importlib.metadata`) rather than by importing them: importing transformers
or deepspeed takes seconds and can fail in exactly the broken environments a bug report is about.

Only the standard library is imported at module level, so `python -m pipeline.env` also runs in an
environment where the pipeline's own dependencies failed to install.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pipeline

# The stack, in the order a reader scans it; each reported as its version or "not installed".
PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "wandb",
            "bitsandbytes", "deepspeed")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(repo: Path) -> str | None:
    """`<short sha>[ (modified)]` of the checkout the pipeline runs from, or None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha} (modified)" if dirty else sha


def cpus() -> str:
    """Logical CPUs, and how many this process may use when a container or taskset limits it."""
    total = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if total is None:
        return "unknown"
    return f"{total}" if usable == total else f"{total} ({usable} usable by this process)"


def memory_gib() -> str:
    """Total physical memory, from sysconf (Linux, macOS) with /proc/meminfo as the fallback."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
        except OSError:
            pass
    return f"{total / 2**30:.1f} GiB" if total else "unknown"


def accelerators() -> list[tuple[str, str]]:
    """(label, value) rows about CUDA and MPS as torch sees them; torch is imported only here (~1 s)."""
    if importlib.util.find_spec("torch") is None:
        return [("gpu", "unknown (torch not installed)")]
    import torch

    rows = [
        ("torch built with CUDA", torch.version.cuda or "no (CPU build)"),
        ("torch built with cuDNN", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available()
         else "no"),
    ]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        rows.append(("cuda available", f"yes, {count} device{'s' * (count != 1)}"))
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                      f"compute capability {props.major}.{props.minor}"))
        rows.append(("bf16 supported", "yes" if torch.cuda.is_bf16_supported() else "no"))
    else:
        rows.append(("cuda available", "no"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_built():
        rows.append(("mps available", "yes" if mps.is_available() else "built, but not available"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        rows.append(("CUDA_VISIBLE_DEVICES", visible))
    return rows


def collect() -> list[tuple[str, str]]:
    """Every (label, value) row of the report, in order."""
    root = Path(pipeline.__file__).resolve().parent.parent
    commit = git_commit(root)
    rows = [
        ("pipeline", f"{pipeline.__version__} ({root})" + (f", git {commit}" if commit else "")),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("cpus", cpus()),
        ("memory", memory_gib()),
    ]
    rows += accelerators()
    rows += [(name, package_version(name)) for name in PACKAGES]
    return rows


def report() -> str:
    rows = collect()
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label + ':':<{width + 2}}{value}\n" for label, value in rows)


if __name__ == "__main__":
    print(report(), end="")
