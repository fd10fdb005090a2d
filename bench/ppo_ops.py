"""Where the operator time of our PPO iterations goes, in the bench's configuration: `torch.profiler` over two
timed iterations (the 3rd and 4th: rollout and update) of the real stage on the bench's assets, then the
share of the matrix products (`aten::mm`, `addmm`, `bmm`, `baddbmm`) and the largest other operators.

    .venv/bin/python bench/ppo_ops.py [--assets runs/bench/assets] [--top 20] [ppo overrides ...]

The matrix products are the floor of an iteration at a given precision: TRL computes the same ones, so their
share says how much room the rest (attention, activations, layer norms, sampling, the optimizer, Python)
leaves for any speed-up (docs/performance.md). The profiler slows the Python around the operators, so the
wall time printed is above what `make bench` measures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from settings import PPOBench, ppo_settings  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=Path, default=ROOT / "runs/bench/assets", help="what bench/assets.py built")
    p.add_argument("--top", type=int, default=20, help="operators listed")
    p.add_argument("overrides", nargs="*", help="extra `ppo` overrides (key=value)")
    args = p.parse_args(argv)
    if not (args.assets / "done").exists():
        raise SystemExit(f"bench_ppo_ops: no bench assets in {args.assets}: run `make bench` (or bench/assets.py) first")

    from torch.profiler import ProfilerActivity, profile

    import pipeline.stages.ppo as stage
    from pipeline.config import load_config

    first, last = 3, 4  # iterations profiled: past the warm-up
    state: dict[str, Any] = {"n": 0}
    sample_batch, ppo_update = stage.sample_batch, stage.ppo_update

    def sample(*a: Any, **k: Any) -> Any:
        state["n"] += 1
        if state["n"] == first:
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        return sample_batch(*a, **k)

    def update(*a: Any, **k: Any) -> Any:
        out = ppo_update(*a, **k)
        if state["n"] == last:
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
        return out

    with tempfile.TemporaryDirectory() as run_dir:
        overrides, _ = ppo_settings(PPOBench(iterations=last + 1), run_dir, str(args.assets / "policy"),
                                    str(args.assets / "rm"))
        cfg = load_config(ROOT / "configs/tiny.yaml", [*overrides, *args.overrides])
        stage.sample_batch, stage.ppo_update = sample, update
        try:
            stage.run(cfg)
        finally:
            stage.sample_batch, stage.ppo_update = sample_batch, ppo_update

    n = last - first + 1
    events = state["prof"].key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / n
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e6 / n
    print(f"per iteration (mean of iterations {first}-{last}): wall {state['wall'] / n:.3f} s under the profiler; "
          f"operators {total:.3f} s, of which matrix products {matmul:.3f} s ({100 * matmul / total:.1f} %)")
    print("| operator | ms / iteration | calls / iteration |\n|---|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"| `{e.key[:70]}` | {e.self_cpu_time_total / 1e3 / n:.1f} | {e.count // n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
