"""`make report`: one self-contained HTML page (plus its PNG plots) about the last pipeline run of a profile.

It reads only what the stages write into `runs/<profile>/<stage>/` — summary.json, log_history.jsonl (the
Trainer's log rows, renamed with `tracking.rewrite_logs` so the names match W&B and summary.json) and
samples.jsonl — so it works offline, without W&B, on whichever stages have finished. The page opens with a
headline: per stage the one or two numbers that matter (`HEADLINE`), also printed by the command. Plots are chosen by
metric name, not by stage code: a stage that logs `train/loss` gets a loss curve, one that logs
`eval/pairwise_acc` an accuracy plot, one that logs `ppo/kl` and `ppo/score` the reward/KL plots, and every
stage with samples.jsonl a column in the side-by-side table of completions.

    python -m pipeline report --config configs/tiny.yaml     # writes runs/tiny/report/index.html + *.png
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.tracking import STEP, rewrite_logs

STAGE_ORDER = ("pretrain", "sft", "rm", "ppo")  # report order; other finished stage directories follow
MAX_PROMPTS = 24  # rows of the side-by-side completions table


@dataclass
class StageLogs:
    """One finished stage as the report sees it."""

    name: str
    path: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # rows in the pipeline's metric names
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary.get("metrics", {})

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of metric `key` over the stage's step axis, non-finite values dropped."""
        points = [(r[STEP], r[key]) for r in self.history if STEP in r and _finite(r.get(key))]
        return [p[0] for p in points], [p[1] for p in points]

    def has(self, key: str) -> bool:
        return any(_finite(r.get(key)) for r in self.history)


@dataclass(frozen=True)
class Curve:
    """Metrics of one stage over its steps, drawn when at least one of them was logged."""

    file: str
    title: str
    stage: str
    metrics: tuple[str, ...]
    ylabel: str
    ylim: tuple[float, float] | None = None
    note: str = ""


@dataclass(frozen=True)
class Scatter:
    """One metric against another, logged in the same rows of one stage, coloured by step."""

    file: str
    title: str
    stage: str
    x: str
    ys: tuple[str, ...]
    xlabel: str
    ylabel: str
    note: str = ""


# The RM and PPO stages plug in through these names (see the README's metric table).
CURVES = (
    Curve("rm_accuracy.png", "Reward model: held-out accuracy", "rm",
          ("eval/pairwise_acc", "eval/rank1_acc", "eval/gold_agreement"), "accuracy", (0.0, 1.0),
          "pairwise: the RM ranks the better completion of a held-out pair higher (chance 0.5); rank-1: it picks "
          "the best of K; gold agreement: its preferences agree with the gold reward's."),
    Curve("ppo_reward.png", "PPO: reward of the policy's samples", "ppo", ("ppo/score", "ppo/gold_score"),
          "score", note="ppo/score is the reward model's (the proxy PPO optimises), ppo/gold_score the gold reward's."),
    Curve("ppo_kl.png", "PPO: KL from the SFT policy", "ppo", ("ppo/kl",), "KL (nats)"),
)
SCATTERS = (
    Scatter("ppo_frontier.png", "PPO: reward vs KL frontier", "ppo", "ppo/kl", ("ppo/score", "ppo/gold_score"),
            "KL from the SFT policy (nats)", "score",
            "Each point is one logged PPO step: how much reward each nat of divergence from SFT bought."),
    Scatter("ppo_gold_vs_proxy.png", "PPO: gold vs proxy score", "ppo", "ppo/score", ("ppo/gold_score",),
            "proxy score (reward model)", "gold score",
            "Reward hacking shows as the proxy rising while the gold score stalls or falls."),
)


@dataclass(frozen=True)
class Number:
    """One headline number of a stage: `label init → final` (or `label final` without an `_init` value)."""

    label: str
    key: str
    digits: int = 3
    at: tuple[str, str] | None = None  # (label, key) of the divergence the number was reached at


# The one or two numbers per stage a reader wants before any table, from its summary.json; the first key of a
# stage that exists wins where two are alternatives (pretrain without held-out data has only its train loss).
HEADLINE: dict[str, tuple[tuple[Number, ...], ...]] = {
    "pretrain": ((Number("held-out loss", "eval/loss"), Number("train loss", "train/loss")),
                 (Number("perplexity", "eval/perplexity", digits=2),)),
    "sft": ((Number("held-out loss", "eval/loss"), Number("train loss", "train/loss")),
            (Number("held-out gold", "eval/gold_score"),)),
    "rm": ((Number("held-out accuracy", "eval/pairwise_acc"),),
           (Number("gold agreement", "eval/gold_agreement"),)),
    "ppo": ((Number("held-out gold", "eval/gold_score", at=("KL", "eval/kl")),),
            (Number("reward-model score", "eval/score", at=("KL", "eval/kl")),)),
}
STAGE_LABELS = {"pretrain": "Pretrain", "sft": "SFT", "rm": "RM", "ppo": "PPO"}


def headline(stages: Sequence[StageLogs]) -> list[str]:
    """`PPO: held-out gold 0.720 → 0.795 at KL 1.07; ...`, one line per finished stage that has its numbers.

    A metric that is missing or not finite is left out, never shown as nan; a stage with none is left out.
    """
    lines = []
    for stage in stages:
        parts = []
        for alternatives in HEADLINE.get(stage.name, ()):
            number = next((n for n in alternatives if _finite(stage.metrics.get(n.key))), None)
            if number is not None:
                # "at KL" once per line: PPO's numbers were all measured on the same samples.
                parts.append(_headline_number(stage.metrics, number, with_at=not parts))
        if parts:
            lines.append(f"{STAGE_LABELS.get(stage.name, stage.name)}: {'; '.join(parts)}")
    return lines


def _headline_number(metrics: dict[str, Any], n: Number, with_at: bool) -> str:
    final, init = metrics[n.key], metrics.get(f"{n.key}_init")
    text = f"{n.label} {init:.{n.digits}f} → {final:.{n.digits}f}" if _finite(init) else f"{n.label} {final:.{n.digits}f}"
    if with_at and n.at is not None and _finite(metrics.get(n.at[1])):
        text += f" at {n.at[0]} {metrics[n.at[1]]:.2f}"
    return text


def load_stages(run_dir: Path) -> list[StageLogs]:
    """Every finished stage under `run_dir` (a directory with summary.json), in pipeline order."""
    if not run_dir.is_dir():
        return []
    dirs = [d for d in run_dir.iterdir() if d.is_dir() and (d / "summary.json").is_file()]
    dirs.sort(key=lambda d: (STAGE_ORDER.index(d.name) if d.name in STAGE_ORDER else len(STAGE_ORDER), d.name))
    return [
        StageLogs(
            name=d.name,
            path=d,
            summary=_read_json(d / "summary.json"),
            history=[rewrite_logs(row) for row in _read_jsonl(d / "log_history.jsonl")],
            samples=_read_jsonl(d / "samples.jsonl"),
        )
        for d in dirs
    ]


def write_report(cfg: Config, out_dir: Path | None = None) -> Path:
    """Write `<run_dir>/report/index.html` and its PNGs; return the HTML path."""
    run_dir = Path(cfg.run_dir)
    stages = load_stages(run_dir)
    if not stages:
        raise ConfigError(f"no finished stage under {run_dir}: run `make sft PROFILE={cfg.profile}` first")
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # plots of stages that no longer exist must not linger
        old.unlink()
    figures = make_figures(stages, out_dir)
    page = render_html(cfg, stages, figures)
    path = out_dir / "index.html"
    path.write_text(page)
    return path


# --------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    path: Path
    title: str
    note: str = ""


def make_figures(stages: Sequence[StageLogs], out_dir: Path) -> list[Figure]:
    """Draw every plot whose data exists; return them in report order."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    by_name = {s.name: s for s in stages}
    figures: list[Figure] = []

    def save(fig: Any, file: str, title: str, note: str = "") -> None:
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        figures.append(Figure(out_dir / file, title, note))

    for stage in stages:  # a loss curve for every stage that logged one
        keys = [k for k in ("train/loss", "eval/loss") if stage.has(k)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for key in keys:
            steps, values = stage.series(key)
            ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
        if _finite(stage.metrics.get("eval/loss_init")):  # the starting model, measured before step 1
            ax.scatter([0], [stage.metrics["eval/loss_init"]], color="black", zorder=3, label="eval/loss_init")
        ax.set(title=f"{stage.name}: loss", xlabel="optimizer step (train/global_step)", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, f"{stage.name}_loss.png", f"{stage.name}: training and held-out loss")

    for curve in CURVES:
        stage = by_name.get(curve.stage)
        keys = [k for k in curve.metrics if stage is not None and stage.has(k)]
        if stage is None or not keys:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for key in keys:
            ax.plot(*stage.series(key), marker="o", markersize=3, label=key)
        ax.set(title=curve.title, xlabel="optimizer step (train/global_step)", ylabel=curve.ylabel)
        if curve.ylim:
            ax.set_ylim(*curve.ylim)
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, curve.file, curve.title, curve.note)

    for scatter in SCATTERS:
        stage = by_name.get(scatter.stage)
        if stage is None:
            continue
        pairs = {y: [(r[scatter.x], r[y], r.get(STEP, 0)) for r in stage.history
                     if _finite(r.get(scatter.x)) and _finite(r.get(y))] for y in scatter.ys}
        pairs = {y: p for y, p in pairs.items() if p}
        if not pairs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for marker, (y, points) in zip("os^", pairs.items(), strict=False):
            xs, ys, steps = zip(*points, strict=True)
            sc = ax.scatter(xs, ys, c=steps, cmap="viridis", marker=marker, label=y, edgecolors="none")
        fig.colorbar(sc, ax=ax, label="step")
        ax.set(title=scatter.title, xlabel=scatter.xlabel, ylabel=scatter.ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, scatter.file, scatter.title, scatter.note)

    bars = gold_by_stage(stages)
    if bars:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        labels, values = zip(*bars, strict=True)
        ax.bar(labels, values, color="tab:green")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
        ax.set(title="Gold score of sampled completions on held-out prompts", ylabel="mean gold score", ylim=(0, 1.05))
        save(fig, "gold_by_stage.png", "Gold score by stage",
             "The toy task's ground-truth reward of each model's samples on the stage's held-out prompts; "
             "'start' is the model the stage began from, measured by that stage.")
    return figures


def gold_by_stage(stages: Sequence[StageLogs]) -> list[tuple[str, float]]:
    """(label, mean gold score) per stage that measured one: its starting model, then its output.

    A stage starts where the previous one ended, so its start bar is drawn only when it measured a different
    number: the first stage, or one evaluated on other prompts (PPO's held-out prompts are not SFT's).
    """
    bars: list[tuple[str, float]] = []
    for stage in stages:
        m = stage.metrics
        start = m.get("eval/gold_score_init")
        if _finite(start) and (not bars or not math.isclose(start, bars[-1][1], abs_tol=1e-9)):
            bars.append((f"{stage.name} start", start))
        if _finite(m.get("eval/gold_score")):
            bars.append((stage.name, m["eval/gold_score"]))
    return bars


# --------------------------------------------------------------------------------------------- HTML


def render_html(cfg: Config, stages: Sequence[StageLogs], figures: Sequence[Figure]) -> str:
    run_dir = Path(cfg.run_dir)
    run_id_file = run_dir / "pipeline_run_id"
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else "(not tracked)"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>rlhf-pipeline report: {_e(cfg.profile)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-family:monospace}"
        "figure{display:inline-block;margin:0.5em;max-width:48%}figure img{max-width:100%}"
        "figcaption{font-size:13px;color:#555}code{background:#f3f3f3;padding:0 3px}"
        "ul.headline{font-size:17px;line-height:1.6}</style></head><body>",
        f"<h1>Pipeline report: profile <code>{_e(cfg.profile)}</code></h1>",
        f"<p>Run directory <code>{_e(str(run_dir))}</code>, pipeline run <code>{_e(run_id)}</code> (the W&amp;B group); "
        f"generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} by <code>python -m pipeline report</code>.</p>",
        *_headline_html(stages),
        *_rounds_html(load_rounds(run_dir)),
        "<h2>Stages</h2>", _stages_table(stages),
        "<h2>Final metrics</h2>",
        "<p>From each stage's summary.json. <code>*_init</code> is the stage's starting model, measured the same way "
        "before training.</p>",
        _metrics_table(stages),
        "<h2>Plots</h2>",
    ]
    for fig in figures:
        data = base64.b64encode(fig.path.read_bytes()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{_e(fig.title)}'>"
                     f"<figcaption><b>{_e(fig.title)}</b> ({_e(fig.path.name)}). {_e(fig.note)}</figcaption></figure>")
    with_samples = [s for s in stages if s.samples]
    if with_samples:
        parts += ["<h2>Completions of held-out prompts</h2>", _samples_table(with_samples)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _headline_html(stages: Sequence[StageLogs]) -> list[str]:
    lines = headline(stages)
    if not lines:
        return []
    items = "".join(f"<li>{_e(line)}</li>" for line in lines)
    return ["<h2>Headline</h2>", f"<ul class='headline'>{items}</ul>",
            "<p><small><code>a → b</code>: the stage's starting model, then its output, on the same held-out data; "
            "KL is the PPO policy's divergence from the SFT policy (nats per completion).</small></p>"]


# ---------------------------------------------------------------------------------------------- RLHF rounds


@dataclass(frozen=True)
class Round:
    """One RLHF round's numbers: round 1 is the profile's chain, round r >= 2 runs/<profile>/round-<r>/
    (`make iterate`), and the oracle run (PPO on the gold reward itself, `make oracle`) is the ceiling."""

    name: str
    ppo_dir: Path
    labels: int | None  # rankings this round added (the label stage's), None for round 1 / the oracle
    rm_agreement_before: float | None  # the previous round's RM on those samples (the label stage measures it)
    rm_agreement: float | None  # this round's RM vs gold on the samples of the policy this round starts from
    gold_init: float | None  # held-out gold of the SFT policy (round 1's starting point, whichever a round starts from)
    gold: float | None  # held-out gold of this round's PPO policy
    kl: float | None  # its held-out KL to SFT (nats per completion)
    rm_agreement_pooled: float | None = None  # rm_agreement pooled over all pairs instead of per prompt

    @property
    def gain(self) -> float | None:
        return None if self.gold is None or self.gold_init is None else self.gold - self.gold_init


def load_rounds(run_dir: Path) -> list[Round]:
    """Every finished round under run_dir, in order, then the oracle run when there is one."""
    rounds = []
    dirs = [("round 1", run_dir)]
    numbered = sorted((int(d.name.split("-")[1]), d) for d in run_dir.glob("round-*") if d.name.split("-")[1].isdigit())
    dirs += [(f"round {n}", d) for n, d in numbered]
    if (run_dir / "oracle" / "ppo" / "summary.json").is_file():
        dirs.append(("oracle (gold reward)", run_dir / "oracle"))
    sft_gold = None  # a round may start from the last policy (ROUND_FROM=last): its own `_init` is not SFT's
    for name, d in dirs:
        ppo = _metrics(d / "ppo")
        if ppo is None:
            continue
        if name == "round 1":
            sft_gold = ppo.get("eval/gold_score_init")
        rm = _metrics(d / "rm") if name != "oracle (gold reward)" else None
        label = _metrics(d / "label") if name.startswith("round ") and name != "round 1" else None
        agreement = pooled = None
        if rm is not None:  # round 1 starts from SFT; round r from round r-1's policy (rm.policy_samples)
            which = "policy" if "eval/gold_agreement_policy_samples" in rm else "sft"
            agreement = rm.get(f"eval/gold_agreement_{which}_samples")
            pooled = rm.get(f"eval/gold_agreement_{which}_samples_pooled")
        rounds.append(Round(name, d / "ppo", label.get("rankings") if label else None,
                            label.get("rm_gold_agreement") if label else None, agreement,
                            sft_gold if sft_gold is not None else ppo.get("eval/gold_score_init"),
                            ppo.get("eval/gold_score"),
                            ppo.get("eval/kl_to_sft", ppo.get("eval/kl")), pooled))
    return rounds


def rounds_lines(rounds: Sequence[Round]) -> list[str]:
    """The rounds side by side as text (`make iterate` prints it)."""
    head = (f"{'':<22}{'new rankings':>13}{'RM-gold agreement':>19}{'(previous RM)':>15}{'(pooled)':>10}"
            f"{'held-out gold':>15}{'gain':>9}{'KL to SFT':>11}")
    lines = [head]
    for r in rounds:
        cells = [_fmt_opt(r.labels, "d"), _fmt_opt(r.rm_agreement), _fmt_opt(r.rm_agreement_before),
                 _fmt_opt(r.rm_agreement_pooled), _fmt_opt(r.gold), _fmt_opt(r.gain, "+.4f"), _fmt_opt(r.kl, ".3f")]
        lines.append(f"{r.name:<22}{cells[0]:>13}{cells[1]:>19}{cells[2]:>15}{cells[3]:>10}{cells[4]:>15}"
                     f"{cells[5]:>9}{cells[6]:>11}")
    if rounds and rounds[0].gold_init is not None:
        lines.append(f"SFT policy held-out gold: {rounds[0].gold_init:.4f}. RM-gold agreement: the round's reward "
                     "model on held-out samples of the policy the round starts from (round 1: SFT), per prompt; previous "
                     "RM: the last round's reward model on the same samples; pooled: the round's reward model over "
                     "all pairs of those samples, where a prompt with n samples weighs ~n².")
    return lines


def _rounds_html(rounds: Sequence[Round]) -> list[str]:
    if len(rounds) < 2:
        return []
    rows = "".join(
        f"<tr><td>{_e(r.name)}</td><td class='num'>{_fmt_opt(r.labels, 'd')}</td>"
        f"<td class='num'>{_fmt_opt(r.rm_agreement)}</td><td class='num'>{_fmt_opt(r.rm_agreement_before)}</td>"
        f"<td class='num'>{_fmt_opt(r.rm_agreement_pooled)}</td>"
        f"<td class='num'>{_fmt_opt(r.gold)}</td>"
        f"<td class='num'>{_fmt_opt(r.gain, '+.4f')}</td><td class='num'>{_fmt_opt(r.kl, '.3f')}</td></tr>"
        for r in rounds)
    return ["<h2>RLHF rounds</h2>",
            "<p>Round 1 is the chain (reward model on the profile's rankings); each later round ranks samples of the "
            "previous round's policy, retrains the reward model from SFT on all rankings so far and runs PPO again "
            "(<code>make iterate</code>). RM-gold agreement: the round's reward model on held-out samples of the "
            "policy the round starts from (the share of its gold-ordered pairs it orders like gold, averaged over "
            "prompts), the previous round's reward model on the same samples, and the round's reward model pooled "
            "over all pairs (a prompt with n samples weighs ~n²).</p>",
            "<table><tr><th>round</th><th>new rankings</th><th>RM-gold agreement</th><th>previous RM</th><th>pooled</th>"
            "<th>held-out gold</th>"
            f"<th>gain over SFT</th><th>KL to SFT</th></tr>{rows}</table>"]


def _metrics(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / "summary.json"
    if not path.is_file():
        return None
    return _read_json(path).get("metrics", {})


def _fmt_opt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)



def _stages_table(stages: Sequence[StageLogs]) -> str:
    rows = ["<table><tr><th>stage</th><th>directory</th><th>finished</th><th>wall time</th><th>steps</th>"
            "<th>seed</th></tr>"]
    for s in stages:
        wall = s.summary.get("wall_time_s")
        rows.append(
            f"<tr><td>{_e(s.name)}</td><td><code>{_e(str(s.path))}</code></td>"
            f"<td>{_e(str(s.summary.get('finished_at', '')))}</td>"
            f"<td class='num'>{f'{wall:.0f} s' if _finite(wall) else ''}</td>"
            f"<td class='num'>{_fmt(s.metrics.get(STEP))}</td><td class='num'>{_fmt(s.summary.get('seed'))}</td></tr>"
        )
    return "\n".join([*rows, "</table>"])


def _metrics_table(stages: Sequence[StageLogs]) -> str:
    keys: list[str] = []
    for s in stages:
        keys += [k for k in s.metrics if k not in keys]
    rows = ["<table><tr><th>metric</th>" + "".join(f"<th>{_e(s.name)}</th>" for s in stages) + "</tr>"]
    for key in keys:
        cells = "".join(f"<td class='num'>{_fmt(s.metrics.get(key))}</td>" for s in stages)
        rows.append(f"<tr><td><code>{_e(key)}</code></td>{cells}</tr>")
    return "\n".join([*rows, "</table>"])


def _samples_table(stages: Sequence[StageLogs]) -> str:
    """Prompts down the side, each stage's first sampled completion (and the prompt's mean gold) across."""
    prompts: list[str] = []
    for s in stages:
        prompts += [r["prompt"] for r in s.samples if r["prompt"] not in prompts]
    prompts = prompts[:MAX_PROMPTS]
    head = "".join(f"<th>{_e(s.name)} completion</th>" for s in stages)
    rows = [f"<table><tr><th>prompt</th>{head}</tr>"]
    for prompt in prompts:
        cells = []
        for s in stages:
            mine = [r for r in s.samples if r["prompt"] == prompt]
            if not mine:
                cells.append("<td></td>")
                continue
            golds = [r["gold"] for r in mine if _finite(r.get("gold"))]
            gold = f"<br><small>gold {sum(golds) / len(golds):.2f} over {len(golds)} samples</small>" if golds else ""
            eos = "" if mine[0].get("ended", True) else " <small>[no EOS]</small>"
            cells.append(f"<td><code>{_e(mine[0]['completion'])}</code>{eos}{gold}</td>")
        rows.append(f"<tr><td><code>{_e(prompt)}</code></td>{''.join(cells)}</tr>")
    return "\n".join([*rows, "</table>"])


# --------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, row {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, row {i}: expected a JSON object")
        rows.append(row)
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return _e(f"{v:.4g}" if math.isfinite(v) else str(v))
    return "" if v is None else _e(str(v))


def _e(text: str) -> str:
    return html.escape(text, quote=True)
