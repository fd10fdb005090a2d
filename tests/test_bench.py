"""The benchmarks run (their speed goals live in their output, never in a timed test)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_rm_throughput_benchmark_trains_both_and_prints_the_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/rm_throughput.py", "--prompts", "24", "--batch-prompts", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "24 prompts with K = 4" in out
    ours = float(re.search(r"this project:\s+([\d.]+) comparisons/s", out).group(1))
    trl = float(re.search(r"TRL RewardTrainer:\s+([\d.]+) comparisons/s", out).group(1))
    ratio = float(re.search(r"ratio:\s+([\d.]+)x", out).group(1))
    assert ours > 0 and trl > 0 and abs(ratio - ours / trl) < 0.01 * ratio + 0.01
