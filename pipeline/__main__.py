"""The CLI: `python -m pipeline <stage> --config configs/<profile>.yaml [dotted.key=value ...]`.

Also `python -m pipeline <stage> --help [--config ...] [key=value ...]` lists every key the stage reads with
its value in that profile, `python -m pipeline config --config ...` prints the resolved config,
`python -m pipeline keys` lists every config key with its type and help, `python -m pipeline env` prints
the versions and hardware a bug report needs, and `python -m pipeline chat runs/<profile>/ppo` talks to a
finished stage's policy (pipeline/chat.py). Under `accelerate launch -m pipeline <stage> ...` the
same command runs on N processes.

User errors (bad config, bad data, a missing or broken previous stage), a full disk and a NaN/Inf that
stopped training (pipeline/guards.py) print one line and exit with status 2 (README: "Bad input and errors");
anything else is a bug and keeps its traceback.
SIGTERM and Ctrl-C stop a stage after its current step with a checkpoint, print how to resume and exit with
143 (SIGTERM) or 130 (SIGINT) (pipeline/signals.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from pipeline.config import (
    STAGES,
    Config,
    ConfigError,
    data_sources,
    describe,
    describe_sources,
    load_config,
    stage_help,
    stage_key,
    to_dict,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:  # sampling options of its own, not config overrides: its own parser
        from pipeline.chat import main as chat_main

        return chat_main(argv[1:])
    # Our own -h: `<stage> --help` shows the stage's keys in the chosen profile, not argparse's usage.
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0],
                                     add_help=False,
                                     epilog="`python -m pipeline <stage> --help [--config ...] [key=value ...]` "
                                     "lists every key a stage reads, with its type, bounds, help and value in "
                                     "the chosen profile.")
    parser.add_argument("-h", "--help", action="store_true", help="this message; after a stage, the stage's keys")
    parser.add_argument("command", nargs="?",
                        choices=[*STAGES, "config", "keys", "stamp", "summary", "compare", "report", "rounds", "env"],
                        help="stage to run; or config (print the resolved config), keys (list all keys), "
                        "env (Python, OS, hardware and library versions, for a bug report), "
                        "chat DIR (talk to a finished stage's policy; chat -h for its options), "
                        "summary (final metrics of the profile's finished stages), "
                        "compare DIR DIR ... (final metrics of finished stage directories side by side, with the "
                        "config keys they differ in), "
                        "report (HTML report with plots of the finished stages, in <run_dir>/report), "
                        "rounds (the RLHF rounds of `make iterate` side by side), "
                        "stamp (refresh the per-stage config stamps the Makefile depends on)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="profile YAML (default: configs/tiny.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with a stage: validate the config and every data source, print counts and one example "
                        "exactly as the model sees it, then exit without training or writing anything")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sft.lr=1e-4")
    lab = parser.add_argument_group("label", "the labeling page and merging labelers' files (command: label)")
    lab.add_argument("--serve", action="store_true", help="serve the labeling page for the to-label file")
    lab.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    lab.add_argument("--port", type=int, default=8765, help="port to serve on (default 8765)")
    lab.add_argument("--lease", type=float, default=900.0,
                     help="seconds an item stays reserved for the labeler it was shown to (default 900)")
    lab.add_argument("--input", help="to-label file (default: <run_dir>/label/to_label.jsonl)")
    lab.add_argument("--output", help="rankings file to append to (default: <run_dir>/label/rankings.jsonl)")
    lab.add_argument("--merge", nargs="+", metavar="FILE", help="merge labelers' rankings files into -o")
    lab.add_argument("-o", dest="merge_output", metavar="FILE", help="output of --merge")
    args = parser.parse_intermixed_args(argv)
    if args.help and args.command not in STAGES:
        parser.print_help()
        return 0
    if args.command is None:
        parser.error("a command is required (a stage, or config, keys, env, ...)")
    if args.command == "env":
        from pipeline.env import report

        print(report(), end="")
        return 0
    if (args.serve or args.merge) and args.command != "label":
        parser.error("--serve and --merge go with the label command")
    if args.merge:
        return merge(args.merge, args.merge_output)

    if args.command == "keys":
        for key, tp, help_ in describe():
            print(f"{key:<36} {tp:<28} {help_}")
        return 0
    if args.command == "compare":
        try:
            return compare([Path(d) for d in args.overrides])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    if args.dry_run and args.command not in STAGES:
        print(f"error: --dry-run applies to the stages ({', '.join(STAGES)}), not to '{args.command}'", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.help:
        print(stage_help(cfg, args.command, args.config, args.overrides), end="")
        return 0
    if args.command == "config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print("# data sources (registry names resolved):")  # a comment: the output stays a loadable profile
        for line in describe_sources(cfg):
            print(f"#   {line}")
        return 0
    if args.command == "stamp":
        write_stamps(cfg)
        return 0
    if args.command == "summary":
        return print_summary(cfg)
    if args.command == "rounds":
        from pipeline.report import load_rounds, rounds_lines

        rounds = load_rounds(Path(cfg.run_dir))
        if not rounds:
            print(f"error: no finished round under {cfg.run_dir}: run `make iterate`", file=sys.stderr)
            return 2
        print("\n".join(rounds_lines(rounds)))
        return 0
    if args.command == "report":
        from pipeline.report import headline, load_stages, write_report  # matplotlib, only when asked for

        try:
            path = write_report(cfg)
            plots = sorted(p.name for p in path.parent.glob("*.png"))
            print(f"report: {path} ({len(plots)} plots: {', '.join(plots)})")
            print("".join(f"  {line}\n" for line in headline(load_stages(Path(cfg.run_dir)))), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    if args.serve:
        return serve(cfg, args)

    # Heavy imports (torch, transformers) only once a stage actually runs: `make` calls `stamp` often.
    from pipeline import signals
    from pipeline.data import DataError
    from pipeline.guards import NonFiniteError
    from pipeline.modeling import ModelLoadError

    _setup_logging()
    error = None
    stopped: tuple[str, int] | None = None
    try:
        if args.dry_run:
            from pipeline import dryrun

            dryrun.run(cfg, args.command)
        else:
            from pipeline.distributed import deepspeed_requested

            if deepspeed_requested():  # a resume must not unpickle code (pipeline/safeload.py)
                from pipeline.safeload import weights_only_deepspeed_checkpoints

                weights_only_deepspeed_checkpoints()
            stage = importlib.import_module(f"pipeline.stages.{args.command}")
            # Only the stages that check for the stop at every step take over SIGTERM / SIGINT (label does not).
            with signals.stop_on_signals() if args.command in signals.STOPPABLE else contextlib.nullcontext():
                stage.run(cfg)
    except signals.Stopped as e:
        stopped = (str(e), e.exit_code)
    except (ConfigError, DataError, ModelLoadError, NonFiniteError) as e:
        error = str(e)
    except Exception as e:
        from pipeline.checkpoint import after_disk_full, is_disk_full

        if not is_disk_full(e):
            raise
        # The main process clears what the failed write left and speaks for all.
        error = ""
        if int(os.environ.get("RANK", "0")) == 0:
            error = f"{args.command}: " + after_disk_full(cfg.stage_dir(args.command), e,
                                                          f"{args.command} PROFILE={cfg.profile}")
    except KeyboardInterrupt:
        print("\ninterrupted: the stage's work directory keeps its last checkpoint; run again to resume",
              file=sys.stderr)
        return 130
    if stopped is not None:
        gc.collect()  # as below: the stopped stage's progress bars draw their last line before the hint
        if int(os.environ.get("RANK", "0")) == 0:  # one line, from the main process only
            print(f"{stopped[0]}; {signals.resume_hint(args.command, cfg.profile, args.config, args.overrides)}",
                  file=sys.stderr)
        return stopped[1]
    if error is not None:
        # A stage that failed mid-training still holds progress bars in the exception's frames; collected
        # now, they draw their last line here, not after the error, which stays the last line printed.
        gc.collect()
        if error:
            print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def serve(cfg: Config, args: argparse.Namespace) -> int:
    """`label --serve`: the labeling page for the label stage's to-label file (pipeline/labelserver.py)."""
    from pipeline.data import DataError
    from pipeline.labelserver import serve as serve_page

    _setup_logging()
    stage_dir = cfg.stage_dir("label")
    summary = stage_dir / "summary.json"
    if args.output is None and summary.is_file():
        built_for = json.loads(summary.read_text())["config"]["label"]["labeler"]
        if built_for != "human":
            print(f"error: {stage_dir} was built with label.labeler={built_for}, and its rankings.jsonl is that "
                  "labeler's: rebuild it with ARGS=\"label.labeler=human\" (or pass --output FILE)", file=sys.stderr)
            return 2
    try:
        serve_page(Path(args.input) if args.input else stage_dir / "to_label.jsonl",
                   Path(args.output) if args.output else stage_dir / "rankings.jsonl", args.host, args.port,
                   args.lease)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def merge(inputs: list[str], output: str | None) -> int:
    """`label --merge A B -o OUT`: several labelers' rankings files into one (pipeline/labeling.py)."""
    from pipeline.data import DataError
    from pipeline.labeling import merge_rankings

    if not output:
        print("error: --merge needs -o OUT (the merged rankings file)", file=sys.stderr)
        return 2
    try:
        stats = merge_rankings([Path(p) for p in inputs], Path(output))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    agreement = "-" if stats["agreement"] is None else f"{stats['agreement']:.1%}"
    print(f"{output}: {stats['rows']} rankings of {stats['items']} items by {len(stats['labelers'])} labelers "
          f"({', '.join(stats['labelers'])}); {stats['repeats_dropped']} repeated rows dropped; "
          f"{stats['items_ranked_more_than_once']} items ranked more than once, agreeing on {agreement} of "
          f"{stats['shared_comparisons']} comparisons both made")
    return 0


def write_stamps(cfg: Config) -> None:
    """Write runs/<profile>/.stamps/<stage>.json, touching a file only when that stage's inputs changed.

    The Makefile makes each stage depend on its stamp, so editing `sft.lr` in the profile (or passing
    ARGS="sft.lr=...") rebuilds sft and what follows, but not pretrain. A stamp also records the size and
    modification time of the stage's local data files, so replacing a data file rebuilds its stage.
    """
    stamps = Path(cfg.run_dir) / ".stamps"
    stamps.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        key = stage_key(cfg, stage)
        key["data_files"] = _fingerprints(_data_sources(cfg, stage))
        path = stamps / f"{stage}.json"
        text = json.dumps(key, indent=1, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def _data_sources(cfg: Config, stage: str) -> list[str]:
    """The local files and folders `stage` reads (registry names resolved to their paths; hub data has none).
    The registry entries themselves are in the stage's key (config.stage_key)."""
    return [path for s in data_sources(cfg, stage) if (path := s.local_path)]


def _fingerprints(sources: list[str]) -> dict[str, list[int]]:
    """(size, mtime) of every local file behind the sources; hub names have none."""
    out: dict[str, list[int]] = {}
    for source in sources:
        path = Path(source)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                out[str(f)] = [st.st_size, st.st_mtime_ns]
    return out


def print_summary(cfg: Config) -> int:
    """Print the final metrics of every finished stage of the profile (what the README's tables quote)."""
    found = 0
    for stage in STAGES:
        path = cfg.stage_dir(stage) / "summary.json"
        if not path.is_file():
            print(f"{stage}: not built (make {stage} PROFILE={cfg.profile})")
            continue
        found += 1
        summary = json.loads(path.read_text())
        print(f"{stage}: {path.parent}  (wall time {summary['wall_time_s']:.0f} s, seed {summary['seed']})")
        for key, value in summary["metrics"].items():
            print(f"  {key:<32} {value:.4f}" if isinstance(value, float) else f"  {key:<32} {value}")
    return 0 if found else 1


def compare(dirs: list[Path]) -> int:
    """Print the final metrics of finished stage directories side by side (what `make ptx-ablation` shows),
    headed by the config keys whose values differ between them."""
    from pipeline.checkpoint import _diff

    if len(dirs) < 2:
        raise ConfigError("compare needs at least two finished stage directories")
    summaries = []
    for d in dirs:
        path = d / "summary.json"
        if not path.is_file():
            raise ConfigError(f"no finished stage at {d} (no summary.json)")
        summaries.append(json.loads(path.read_text()))
    width = max(14, *(len(str(d)) for d in dirs))
    print(f"{'':<34}" + "".join(f"{d!s:>{width + 2}}" for d in dirs))
    differ = sorted({k for s in summaries[1:] for k in _diff(summaries[0]["config"], s["config"])})
    for key in differ:
        values = [_dotted(s["config"], key) for s in summaries]
        print(f"{key:<34}" + "".join(f"{v!s:>{width + 2}}" for v in values))
    keys = list(dict.fromkeys(k for s in summaries for k in s["metrics"]))
    for key in keys:
        values = [s["metrics"].get(key) for s in summaries]
        cells = [f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v) for v in values]
        print(f"{key:<34}" + "".join(f"{c:>{width + 2}}" for c in cells))
    return 0


def _dotted(d: dict, key: str) -> object:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _setup_logging() -> None:
    # Only the main process talks; the others would repeat every line N times.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
