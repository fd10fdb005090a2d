"""`make bench`: this project's stages against plain TRL, side by side on one machine in one run.

    make bench                          # PPO, PPO-ptx, SFT, RM; 3 alternating rounds, median; ~13 min on 2 busy cores
    make bench BENCH_ARGS="--quick"     # the same lines on tiny settings, 1 round (about 3 minutes)
    .venv/bin/python bench/run.py --repeats 5 --only ppo

Every measurement is its own process (so its peak resident memory is its own): ours with the project's .venv
(bench/ours.py, the real stage entry points), TRL with the peer venv bench/.peer-venv (bench/peer.py: trl
1.12.0, torch 2.13.0 and the project's own transformers / accelerate / datasets versions), created here on
first use, never part of the project's dependencies. The runs of each pair alternate, A B then B A, for
`--repeats` rounds; the table shows the median of each side and the ratio ours / TRL (> 1: ours is faster),
then the ratio of the fastest run of each side ("best", as timeit reports: other load only slows a run down).

What is timed (the docstrings of bench/ours.py and bench/peer.py say exactly where the clock starts):
  PPO      episodes/s and generated tokens/s of iterations 2..N (iteration 1 is a warm-up): rollout (generate,
           policy / reference / value / reward forwards), rewards and GAE, the PPO epochs, logging. Not timed:
           loading, our held-out evaluation before and after (TRL has none), saving. Both sides: the tiny
           GPT-2 (bench/assets.py) from identical weights, one that never emits EOS, so every completion has
           `max_new_tokens` tokens on both sides (each side's count is checked against that); 64 prompts from
           data/tiny/prompts.train.jsonl per iteration, 4 PPO epochs of 4 minibatches of 16 (16 optimizer steps
           per iteration), 24 new tokens, reference / reward / value models of the policy's size
           (bench/settings.py: ppo_settings maps one settings object to both configurations).
           "PPO-ptx": ours with γ_ptx = 1 (8 corpus blocks of 128 tokens added to every optimizer step), against
           the same TRL runs, which have no ptx term.
  roofline the FLOP/s our PPO optimization phase reaches, against plain float32 torch.matmul on the model's
           own matrix sizes (one minibatch's rows) in the same process: FLOPs = 6 × (N_policy + N_value) ×
           tokens of every minibatch sequence (prompt + completion) of every PPO epoch (+ 6 × N_policy × ptx
           tokens), N = matmul parameters per token (12·d² per block, + vocab·d LM head or d value head).
  SFT      tokens/s (every input token; loss on the completion only) from on_train_begin to on_train_end:
           our sft stage's TRL SFTTrainer configuration vs a plain TRL 1.12 SFTTrainer, same rows, batch 32,
           length 64, schedule; without packing, then both packed ("SFT (packed)": sft.packing / TRL's
           packing=True, the same best-fit-decreasing rows, 32 per batch; TRL flattens a batch into one
           padding-free row, ours keeps the rows: pipeline/packing.py, RowPackedCollator).
           What stays different, as each trainer does it: ours clips the gradient norm (1.0; TRL 1.12's PPO
           loop does not clip), runs the rollout's forwards in minibatch-size chunks (TRL: one chunk of 64) and
           scores each completion with the tiny task's gold reward for its logs (TRL has none).
  RM       comparisons/s of one epoch of K = 4 rankings (bench/rm_throughput.py): our per-prompt ranking
           trainer vs TRL's RewardTrainer of the project's .venv (trl 1.16; pairs, two forwards each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from settings import PEER_TORCH, PEER_TRL, PPOBench, machine  # noqa: E402

PEER_VENV = ROOT / "bench/.peer-venv"
PINNED = ("transformers", "accelerate", "datasets")  # as in the project's venv: only the trainer differs


def peer_pins() -> list[str]:
    return [PEER_TORCH, PEER_TRL, *(f"{name}=={md.version(name)}" for name in PINNED)]


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """The peer's python, (re)creating its venv when missing or pinned differently. torch is installed first
    and pinned, so pip takes the CPU wheel on a CPU machine instead of pulling a CUDA build."""
    python, stamp = venv / "bin/python", venv / ".pins"
    pins = peer_pins()
    if python.exists() and stamp.is_file() and stamp.read_text().split() == pins:
        return python
    print(f"bench: creating the peer venv {venv.relative_to(ROOT)} ({' '.join(pins)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, pins[0]], check=True)
    subprocess.run([*pip, *pins[1:]], check=True)
    stamp.write_text("\n".join(pins) + "\n")
    return python


def run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench: {' '.join(cmd)} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("BENCH "):])


def jobs(args: argparse.Namespace, peer_python: Path | None) -> dict[str, list[tuple[str, list[str]]]]:
    """Per comparison: its (side, command) runs, alternated within each round."""
    ours, assets = [sys.executable, "bench/ours.py"], ["--assets", str(args.assets)]
    iters = ["--iterations", str(args.iterations)]
    sft_data = ["--sft-data", "demos.quick.jsonl" if args.quick else "demos.jsonl"]
    rm = [sys.executable, "bench/rm_throughput.py", "--repeats", "1",
          *(["--prompts", "48", "--batch-prompts", "8"] if args.quick else [])]
    peer = [str(peer_python), "bench/peer.py"] if peer_python else None
    out: dict[str, list[tuple[str, list[str]]]] = {}
    if "ppo" in args.only:
        out["ppo"] = [("ours", [*ours, "ppo", *assets, *iters]), ("ours_ptx", [*ours, "ppo", "--ptx", *assets, *iters])]
        if peer:
            out["ppo"].append(("trl", [*peer, "ppo", *assets, *iters]))
    if "sft" in args.only:
        for stage, packing in (("sft", []), ("sft_packed", ["--packing"])):
            out[stage] = [("ours", [*ours, "sft", *assets, *sft_data, *packing])]
            if peer:
                out[stage].append(("trl", [*peer, "sft", *assets, *sft_data, *packing]))
    if "rm" in args.only:
        out["rm"] = [("ours", [*rm, "--side", "ours"]), ("trl", [*rm, "--side", "trl"])]
    return out


def peak_gpu(runs: list[dict[str, Any]]) -> float | None:
    """The largest peak GPU memory of a side's runs; None when they ran on the CPU."""
    peaks = [r["peak_gpu_mib"] for r in runs if r.get("peak_gpu_mib") is not None]
    return max(peaks) if peaks else None


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The table's rows: median throughput of each side, the ratio, and each side's largest peak RSS."""
    rows = []

    def row(name: str, stage: str, ours: str, trl: str | None, key: str, unit: str) -> None:
        sides = results.get(stage, {})
        if ours not in sides:
            return
        o = median_of(sides[ours], key)
        t = median_of(sides[trl], key) if trl and trl in sides else None
        best = max(r[key] for r in sides[ours]) / max(r[key] for r in sides[trl]) if t else None
        rows.append({"stage": name, "ours": o, "trl": t, "unit": unit, "ratio": o / t if t else None,
                     "ratio_best": best,
                     "rss_ours_mib": max(r["peak_rss_mib"] for r in sides[ours]),
                     "rss_trl_mib": max(r["peak_rss_mib"] for r in sides[trl]) if t else None,
                     "gpu_ours_mib": peak_gpu(sides[ours]), "gpu_trl_mib": peak_gpu(sides[trl]) if t else None})

    row("PPO (ptx off)", "ppo", "ours", "trl", "episodes_per_s", "episodes/s")
    row("PPO (ptx off)", "ppo", "ours", "trl", "tokens_per_s", "gen. tokens/s")
    row("PPO-ptx (ours γ=1)", "ppo", "ours_ptx", "trl", "episodes_per_s", "episodes/s")
    row("SFT", "sft", "ours", "trl", "tokens_per_s", "tokens/s")
    row("SFT (packed)", "sft_packed", "ours", "trl", "tokens_per_s", "tokens/s")
    row("RM (K = 4)", "rm", "ours", "trl", "comparisons_per_s", "comparisons/s")
    return rows


def roofline(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any] | None:
    runs = results.get("ppo", {}).get("ours")
    if not runs:
        return None
    achieved, peak = median_of(runs, "opt_flops_per_s"), median_of(runs, "matmul_flops_per_s")
    return {"opt_gflops_per_s": achieved / 1e9, "matmul_gflops_per_s": peak / 1e9, "fraction": achieved / peak,
            "matmul_rows": runs[0]["minibatch_seq"][0] * runs[0]["minibatch_seq"][1]}


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def report(doc: dict[str, Any]) -> str:
    gpu = any(r.get("gpu_ours_mib") is not None for r in doc["table"])
    lines = [f"{'stage':<20} {'ours':>10} {'TRL':>10}  {'unit':<15} {'ratio':>6} {'(best)':>7}  {'RSS ours':>9} "
             f"{'RSS TRL':>9}" + (f"  {'GPU ours':>10} {'GPU TRL':>10}" if gpu else "")]
    for r in doc["table"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        best = f"{r['ratio_best']:.2f}x" if r.get("ratio_best") else "-"
        rss_t = f"{r['rss_trl_mib']:.0f} MiB" if r["rss_trl_mib"] else "-"
        line = (f"{r['stage']:<20} {fmt(r['ours']):>10} {fmt(r['trl']):>10}  {r['unit']:<15} {ratio:>6} "
                f"{best:>7}  {r['rss_ours_mib']:>5.0f} MiB {rss_t:>9}")
        if gpu:
            mib = [f"{r[k]:.0f} MiB" if r.get(k) is not None else "-" for k in ("gpu_ours_mib", "gpu_trl_mib")]
            line += f"  {mib[0]:>10} {mib[1]:>10}"
        lines.append(line)
    if doc["roofline"]:
        rf = doc["roofline"]
        lines.append(f"roofline: PPO optimization {rf['opt_gflops_per_s']:.1f} GFLOP/s = {100 * rf['fraction']:.0f} % "
                     f"of float32 torch.matmul{' on the GPU' if gpu else ''} on its own shapes ({rf['matmul_gflops_per_s']:.1f} GFLOP/s, "
                     f"{rf['matmul_rows']} rows); FLOPs = 6 x (N_policy + N_value) x tokens (+ 6 x N_policy x ptx "
                     "tokens)")
    for check in doc["checks"]:
        lines.append(f"check: {check}")
    m = doc["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, "
                 f"{('GPU ' + m['gpu'] + ', ') if m.get('gpu') else ''}torch threads {m['torch_threads']}, "
                 f"{doc['date']}; median of {doc['repeats']} alternating runs per side (best: the fastest run of "
                 f"each){' (--quick)' if doc['quick'] else ''}")
    return "\n".join(lines)


def peer_trl_versions(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """The TRL version(s) TRL's side reported (each peer run prints its own)."""
    return ", ".join(sorted({r["trl"] for s in results.values() for r in s.get("trl", []) if "trl" in r})) or "?"


def token_checks(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Both PPO sides must generate what they were asked to (every episode `max_new_tokens` long) and take
    the optimizer steps the settings say; both SFT sides the same number of optimizer steps."""
    out = []
    for side, runs in results.get("ppo", {}).items():
        bad = [r for r in runs if r["tokens"] != r["expected_tokens"]]
        out.append(f"PPO {side}: {'UNEQUAL' if bad else 'all'} completions {'not ' if bad else ''}at full length "
                   f"({runs[0]['tokens']} tokens in {runs[0]['episodes']} timed episodes per run)")
        if "optimizer_steps" in runs[0]:
            bad = [r for r in runs if r["optimizer_steps"] != r["expected_steps"]]
            out.append(f"PPO {side}: {'UNEQUAL' if bad else runs[0]['optimizer_steps']} optimizer steps"
                       f"{' (expected ' + str(runs[0]['expected_steps']) + ')' if bad else ' per run, as set'}")
    trl_ppo = [r for r in results.get("ppo", {}).get("trl", []) if "gc_seconds" in r]
    if trl_ppo:
        share = statistics.median(r["gc_seconds"] / r["seconds"] for r in trl_ppo)
        out.append(f"PPO trl: gc.collect() took {100 * share:.0f} % of TRL's timed seconds (median; TRL 1.12 calls it "
                   "twice per iteration, ours never)")
    pinned = PEER_TRL.split("==")[1]
    for stage in ("ppo", "sft", "sft_packed"):
        other = sorted({r["trl"] for r in results.get(stage, {}).get("trl", []) if r.get("trl", pinned) != pinned})
        if other:
            out.append(f"{stage.upper()} trl: TRL {', '.join(other)}, NOT the pinned {pinned}")
    for stage, name in (("sft", "SFT"), ("sft_packed", "SFT (packed)")):
        steps = {side: {r.get("optimizer_steps") for r in runs} for side, runs in results.get(stage, {}).items()}
        if len(steps) == 2:
            same = len(set.union(*steps.values())) == 1
            out.append(f"{name}: {'the same' if same else 'UNEQUAL'} optimizer steps on both sides "
                       f"({', '.join(f'{k} {sorted(v)}' for k, v in steps.items())})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, one round: a check, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3; --quick: 1)")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"PPO iterations per run, the first untimed (default {PPOBench.iterations}; --quick: 2)")
    p.add_argument("--only", nargs="+", choices=["ppo", "sft", "rm"], default=["ppo", "sft", "rm"])
    p.add_argument("--no-peer", action="store_true", help="ours only: no TRL 1.12 venv (the RM line keeps its TRL)")
    p.add_argument("--peer-python", type=Path, default=None, metavar="PYTHON",
                   help="run TRL's side with this interpreter (one that imports trl 1.12) instead of creating "
                        "bench/.peer-venv: for a machine with no package index, e.g. a GPU box with wheels carried in")
    p.add_argument("--assets", type=Path, default=Path("runs/bench/assets"))
    p.add_argument("--json", type=Path, default=Path("runs/bench/bench.json"))
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the table of an earlier run's JSON again (this version's layout), run nothing")
    args = p.parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        doc.update(table=table(doc["runs"]), roofline=roofline(doc["runs"]), checks=token_checks(doc["runs"]))
        print(report(doc))
        return 0
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.iterations = args.iterations or (2 if args.quick else PPOBench.iterations)
    os.chdir(ROOT)

    import assets

    peer_python = None if args.no_peer or args.only == ["rm"] else args.peer_python or ensure_peer_venv()
    assets.build(args.assets)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    plan = jobs(args, peer_python)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {stage: {} for stage in plan}
    for round_ in range(args.repeats):
        for stage, runs in plan.items():
            for side, cmd in runs if round_ % 2 == 0 else runs[::-1]:  # A B, then B A
                r = run_child(cmd, env)
                results[stage].setdefault(side, []).append(r)
                rate = r.get("episodes_per_s") or r.get("tokens_per_s") or r.get("comparisons_per_s")
                gpu = f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") is not None else ""
                print(f"  round {round_ + 1}: {stage:<3} {side:<8} {rate:10.2f}  peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}",
                      flush=True)
    every = [r for s in results.values() for rs in s.values() for r in rs]
    threads = sorted({r["torch_threads"] for r in every if "torch_threads" in r})
    gpus = sorted({r["gpu"] for r in every if r.get("gpu")})  # the children import torch; this process need not
    doc = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**machine(), "gpu": ", ".join(gpus) or None,
                    "torch_threads": threads[0] if len(threads) == 1 else threads},
        "quick": args.quick, "repeats": args.repeats, "ppo_iterations": args.iterations,
        "peer": (f"{args.peer_python} (trl {peer_trl_versions(results)})" if args.peer_python else peer_pins())
        if peer_python else None,
        "table": table(results), "roofline": roofline(results), "checks": token_checks(results), "runs": results,
    }
    text = report(doc)
    print("\n" + text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
