"""L2T against GRPO and a length penalty on the synthetic arithmetic task: accuracy and tokens, one command.

    python -m benchmarks.efficiency.run --out outputs/efficiency --steps S --lr LR --lp-coefs C1,C2 \
        [--seeds 0,1,2] [--eval-split validation|test] [--summary docs/efficiency/summary.json]
    python -m benchmarks.efficiency.run --out /tmp/eff_smoke --smoke      # 1 seed, 2 steps, tiny eval

1. Builds the offline assets once (``l2t_verl.assets.build_all``): 1-4-step problems and a warm start
   whose traces re-check as they go (0-2 redundant episodes in every gap between steps), so the
   starting policy is competent and over-thinks. A validation split, disjoint from train and test, is
   written beside them: settings are chosen on it, the test split is only for the report.
2. Checks the signal L2T trains on before any RL run (:mod:`benchmarks.efficiency.signal`): delta_J of
   necessary vs redundant episodes on the warm start's own samples.
3. Trains every method from that warm start, per seed, with the same batch, budget, lr and number of
   steps, each through ``python -m l2t_verl.main preset=tiny task=arith`` in a subprocess
   (:mod:`l2t_verl.tiny_run`, as scripts/quickstart.sh does): GRPO, L2T, the length-penalty baseline at
   each ``--lp-coefs``; then the ablations on ``--ablation-seeds``, and any ``--extra NAME=override,override``
   run.
4. Evaluates every final HF checkpoint and the warm start on the chosen split
   (:mod:`benchmarks.efficiency.evaluate`), and writes ``results.json``, ``summary.json`` (the verdict
   against the targets, per-seed figures), ``table.md`` and PNG plots under ``--out``.

A run whose checkpoint already exists is not retrained (delete its folder to redo it), so an
interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2t_verl import tiny_run
from l2t_verl.summary import read_metrics

REPO = Path(__file__).resolve().parents[2]

# Every L2T variant is `algo=l2t` plus these overrides; GRPO is `algo=grpo`.
ABLATIONS: dict[str, list[str]] = {
    "l2t_no_penalty": ["l2t.penalty.enable=false"],
    "l2t_no_progress": ["l2t.progress.enable=false"],
    "l2t_random_layers": ["l2t.penalty.proxy=random_layers"],
}
DEFAULT_ABLATIONS = "l2t_no_penalty,l2t_no_progress"
LENGTH_PENALTY = "length_penalty"
# Scalar metrics aggregated over seeds (mean +- sample std) in the table.
TABLE_METRICS = (
    ("accuracy", "pass@1"),
    ("mean_tokens", "tokens"),
    ("mean_redundant_tokens", "redundant tok"),
    ("mean_redundant_episodes", "redundant ep"),
    ("mean_episodes", "episodes"),
    ("mean_necessary_episodes", "necessary ep"),
)


@dataclass
class RunSpec:
    name: str  # method name: grpo, l2t, an ablation or an extra run
    algo: str
    seed: int
    overrides: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}_s{self.seed}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "efficiency")
    p.add_argument("--seeds", default="0,1,2", help="training (and eval sampling) seeds, comma-separated")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (GRPO group)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-response", type=int, default=224)
    p.add_argument("--methods", default="grpo,l2t", help="main methods, trained on every seed")
    p.add_argument(
        "--lp-coefs", default="", help="length-penalty baseline coefficients (length_penalty@C), every seed"
    )
    p.add_argument("--ablations", default=DEFAULT_ABLATIONS, help=f"from {sorted(ABLATIONS)}")
    p.add_argument("--ablation-seeds", default="0", help="seeds for the ablations; empty for none")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=OVR[,OVR...]",
        help="an additional L2T run on every seed of --ablation-seeds, e.g. l2t_beta2=l2t.beta=2.0",
    )
    p.add_argument("--assets-seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--min-steps", type=int, default=1, help="operations per problem, every split")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--eval-size", type=int, default=256, help="held-out test problems")
    p.add_argument("--val-size", type=int, default=256, help="validation problems (for choosing settings)")
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="what the models are evaluated on: choose settings on validation, report on test",
    )
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem")
    p.add_argument("--sft-steps", type=int, default=3000)
    p.add_argument("--sft-redundant-max", type=int, default=0)
    p.add_argument("--sft-redundant-per-gap", type=int, default=2)
    p.add_argument(
        "--signal-steps",
        type=int,
        default=2,
        help="steps of the signal check before training (benchmarks.efficiency.signal); 0 skips it",
    )
    p.add_argument("--summary", type=Path, default=None, help="also write the summary JSON here")
    p.add_argument("--smoke", action="store_true", help="1 seed, 2 steps, batch 4, tiny eval, no ablations")
    p.add_argument("--report-only", action="store_true", help="re-evaluate and report, train nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batch, args.ablation_seeds, args.extra = "0", 2, 4, "", []
        args.train_size, args.eval_size, args.val_size, args.eval_samples, args.sft_steps = 64, 16, 16, 1, 300
        args.max_response, args.lp_coefs, args.signal_steps = 128, "", 0
    return args


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def plan(args: argparse.Namespace) -> list[RunSpec]:
    runs = [RunSpec(m, m, s) for s in _ints(args.seeds) for m in args.methods.split(",") if m]
    runs += [
        RunSpec(f"{LENGTH_PENALTY}@{c}", LENGTH_PENALTY, s, [f"length_penalty.coef={c}"])
        for s in _ints(args.seeds)
        for c in args.lp_coefs.split(",")
        if c
    ]
    for s in _ints(args.ablation_seeds):
        runs += [RunSpec(name, "l2t", s, list(ABLATIONS[name])) for name in args.ablations.split(",") if name]
        for extra in args.extra:
            name, _, ovr = extra.partition("=")
            runs.append(RunSpec(name, "l2t", s, [o for o in ovr.split(",") if o]))
    return runs


def validation_split(paths: dict[str, Path], args: argparse.Namespace) -> Path:
    """``data/validation.parquet`` beside the assets: problems of neither train nor test, for choosing
    settings (the test split is only for the final report)."""
    import pandas as pd

    from l2t_verl.arith_task import make_problems, write_dataset

    path = paths["root"] / "data" / "validation.parquet"
    if not path.exists():
        seen = [p[0]["content"] for f in ("train", "test") for p in pd.read_parquet(paths[f])["prompt"]]
        rows = make_problems(
            args.val_size, args.assets_seed, args.min_steps, args.max_steps, split="validation", exclude=seen
        )
        write_dataset(rows, path)
    return path


def trainer_command(run: RunSpec, args: argparse.Namespace, assets: Path, out: Path) -> list[str]:
    """``python -m l2t_verl.main`` for one run: the same batch, budget, lr and steps for every method."""
    return tiny_run.command(
        assets,
        out,
        run.algo,
        args.steps,
        batch=args.batch,
        n=args.n,
        data_seed=run.seed,
        val_files=assets / "data" / "validation.parquet",
        checkpoint_dir=out / "ckpt",
        overrides=[
            f"data.max_response_length={args.max_response}",
            f"actor_rollout_ref.rollout.seed={run.seed}",
            f"actor_rollout_ref.actor.optim.lr={args.lr}",
            f"trainer.experiment_name=efficiency_{run.key}",
            *run.overrides,
        ],
    )


def train(run: RunSpec, args: argparse.Namespace, assets: Path) -> dict[str, Any]:
    """Train one run in a subprocess unless its final checkpoint exists; return its record."""
    out = args.out / "runs" / run.key
    hf_dir = out / "ckpt" / f"global_step_{args.steps}" / "actor" / "huggingface"
    record: dict[str, Any] = {"key": run.key, "name": run.name, "seed": run.seed, "hf_dir": str(hf_dir)}
    timing = out / "wall_s.json"
    if hf_dir.joinpath("config.json").exists() and timing.exists():
        record.update(json.loads(timing.read_text()))
        return record
    print(f"[efficiency] training {run.key} ({run.algo} {' '.join(run.overrides)})", flush=True)
    finished = tiny_run.run(trainer_command(run, args, assets, out), out, cwd=REPO)
    if not hf_dir.joinpath("config.json").exists():
        raise RuntimeError(f"training {run.key} saved no {hf_dir}; log tail:\n{finished.log_tail()}")
    wall = finished.wall_s
    timing.write_text(json.dumps({"train_wall_s": round(wall, 1)}) + "\n")
    print(f"[efficiency] {run.key} trained in {wall:.0f} s", flush=True)
    record["train_wall_s"] = round(wall, 1)
    return record


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def aggregate(evals: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Mean and sample std over seeds of every scalar, per tier and per budget, for each method."""
    out: dict[str, dict[str, Any]] = {}
    for name, rows in evals.items():
        agg: dict[str, Any] = {k: _mean_std([r[k] for r in rows]) for k, _ in TABLE_METRICS}
        agg["budget_accuracy"] = {
            b: _mean_std([r["budget_accuracy"][b] for r in rows]) for b in rows[0]["budget_accuracy"]
        }
        tiers: dict[str, Any] = {}
        for tier in rows[0]["by_tier"]:
            per = [r["by_tier"][tier] for r in rows if tier in r["by_tier"]]
            depth = max(len(p["acc_k"]) for p in per)
            tiers[tier] = {
                k: _mean_std([p[k] for p in per])
                for k in (
                    "accuracy",
                    "mean_tokens",
                    "mean_episodes",
                    "mean_redundant_episodes",
                    "mean_necessary_episodes",
                    "settle_depth",
                )
            }
            # A run whose responses are shorter has flat Acc(k) beyond its own depth.
            tiers[tier]["acc_k"] = [
                statistics.fmean(p["acc_k"][min(k, len(p["acc_k"]) - 1)] for p in per) for k in range(depth)
            ]
        agg["by_tier"] = tiers
        agg["seeds"] = len(rows)
        out[name] = agg
    return out


def _fmt(ms: dict[str, float], digits: int = 3) -> str:
    if ms["n"] == 0:
        return "-"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}" if ms["n"] > 1 else f"{ms['mean']:.{digits}f}"


def markdown_table(agg: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | seeds | " + " | ".join(label for _, label in TABLE_METRICS) + " | tokens vs GRPO |",
        "|---" * (len(TABLE_METRICS) + 3) + "|",
    ]
    grpo_tokens = agg.get("grpo", {}).get("mean_tokens", {}).get("mean")
    for name, a in agg.items():
        digits = {"accuracy": 3}
        cells = [_fmt(a[k], digits.get(k, 1)) for k, _ in TABLE_METRICS]
        ratio = f"{a['mean_tokens']['mean'] / grpo_tokens:.2f}" if grpo_tokens else "-"
        lines.append(f"| {name} | {a['seeds']} | " + " | ".join(cells) + f" | {ratio} |")
    lines += [
        "",
        "Per tier (pass@1 / mean episodes / settle depth = episodes before the forced answer is right):",
        "",
    ]
    tiers = sorted({t for a in agg.values() for t in a["by_tier"]})
    lines.append("| method | " + " | ".join(f"tier {t}" for t in tiers) + " |")
    lines.append("|---" * (len(tiers) + 1) + "|")
    for name, a in agg.items():
        cells = []
        for t in tiers:
            bt = a["by_tier"].get(t)
            cells.append(
                "-" if bt is None else
                f"{_fmt(bt['accuracy'], 2)} / {_fmt(bt['mean_episodes'], 1)} / {_fmt(bt['settle_depth'], 1)}"
            )  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy under token budgets (right and at most B tokens):", ""]
    budgets = list(next(iter(agg.values()))["budget_accuracy"])
    lines.append("| method | " + " | ".join(f"B={b}" for b in budgets) + " |")
    lines.append("|---" * (len(budgets) + 1) + "|")
    for name, a in agg.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(a["budget_accuracy"][b], 2) for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def method_summary(per_run: dict[str, dict], records: Sequence[dict], seeds: Sequence[int]) -> dict[str, Any]:
    """``methods`` of summary.json: per method its seeds and one value per seed of each headline figure."""
    names = {r["key"]: (r["name"], r["seed"]) for r in records}
    names.update({f"warm_start_s{s}": ("warm_start", s) for s in seeds})
    out: dict[str, Any] = {}
    for key, res in per_run.items():
        name, seed = names[key]
        m = out.setdefault(
            name,
            {"seeds": [], "pass_at_1": [], "tokens": [], "redundant_tokens": [], "necessary_episodes": []},
        )
        m["seeds"].append(seed)
        m["pass_at_1"].append(res["accuracy"])
        m["tokens"].append(res["mean_tokens"])
        m["redundant_tokens"].append(res["mean_redundant_tokens"])
        m["necessary_episodes"].append(res["mean_necessary_episodes"])
    return out


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], draws: int = 10_000, seed: int = 0
) -> list[float]:
    """95% percentile interval of mean(a - b) over seed-paired differences, resampling the pairs."""
    import random

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choice(diffs) for _ in diffs) for _ in range(draws))
    return [means[int(0.025 * draws)], means[int(0.975 * draws) - 1]]


def frontier_at(methods: dict[str, Any], tokens: float) -> float | None:
    """pass@1 of the length-penalty frontier at ``tokens``: the straight line between the two
    length-penalty points (means over seeds) whose token counts bracket it; None if none do."""
    points = sorted(
        (statistics.fmean(m["tokens"]), statistics.fmean(m["pass_at_1"]))
        for name, m in methods.items()
        if name.startswith(f"{LENGTH_PENALTY}@")
    )
    for (t0, a0), (t1, a1) in zip(points, points[1:], strict=False):
        if t0 <= tokens <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (tokens - t0) / (t1 - t0)
    return None


def verdict(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """The experiment's targets (means over seeds), each with its value and whether it is met."""
    if not all(k in methods for k in ("warm_start", "grpo", "l2t")):
        return []

    def mean(name: str, key: str) -> float:
        return statistics.fmean(methods[name][key])

    warm, grpo, l2t = (mean(n, "pass_at_1") for n in ("warm_start", "grpo", "l2t"))
    rows = [
        ("warm start pass@1 >= 0.5", warm, warm >= 0.5),
        ("GRPO pass@1 >= warm start - 0.03", grpo - warm, grpo >= warm - 0.03),
        ("L2T tokens <= 0.70 x GRPO", mean("l2t", "tokens") / mean("grpo", "tokens"),
         mean("l2t", "tokens") <= 0.70 * mean("grpo", "tokens")),
        ("L2T pass@1 >= GRPO - 0.02", l2t - grpo, l2t >= grpo - 0.02),
        ("L2T redundant tokens <= 0.3 x GRPO",
         mean("l2t", "redundant_tokens") / max(mean("grpo", "redundant_tokens"), 1e-9),
         mean("l2t", "redundant_tokens") <= 0.3 * mean("grpo", "redundant_tokens")),
        ("L2T necessary episodes >= 0.9 x warm start",
         mean("l2t", "necessary_episodes") / max(mean("warm_start", "necessary_episodes"), 1e-9),
         mean("l2t", "necessary_episodes") >= 0.9 * mean("warm_start", "necessary_episodes")),
    ]  # fmt: skip
    line = frontier_at(methods, mean("l2t", "tokens"))
    rows.append(
        ("L2T on or above the length-penalty frontier", None if line is None else l2t - line,
         None if line is None else l2t >= line)
    )  # fmt: skip
    return [{"target": t, "value": v, "met": m} for t, v, m in rows]


def verdict_table(targets: list[dict[str, Any]], methods: dict[str, Any]) -> str:
    """The targets first, then the paired L2T - GRPO differences over seeds."""
    if not targets:
        return ""
    lines = ["| target | value | met |", "|---|---|---|"]
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        met = (
            "n/a (no bracketing length-penalty points)"
            if t["met"] is None
            else ("yes" if t["met"] else "**no**")
        )
        lines.append(f"| {t['target']} | {value} | {met} |")
    l2t, grpo = methods["l2t"], methods["grpo"]
    if l2t["seeds"] == grpo["seeds"] and len(l2t["seeds"]) > 1:
        lines += ["", "L2T - GRPO, seed-paired (mean, 95% bootstrap interval over seeds):", ""]
        for key in ("pass_at_1", "tokens", "redundant_tokens"):
            diff = statistics.fmean(a - b for a, b in zip(l2t[key], grpo[key], strict=True))
            lo, hi = paired_bootstrap(l2t[key], grpo[key])
            lines.append(f"- {key}: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return "\n".join(lines) + "\n\n"


# Per-step training metrics averaged over a run's steps: the reward scales behind L2T's process signal.
DIAGNOSTICS = (
    ("critic/score/mean", "outcome"),
    ("response_length/mean", "resp tok"),
    ("l2t/episodes_per_response/mean", "episodes"),
    ("l2t/jr_first", "J_r first"),
    ("l2t/jr_last", "J_r last"),
    ("l2t/delta_jr_mean", "mean dJ"),
    ("l2t/penalty_raw_mean", "raw p"),
    ("l2t/process_reward_mean", "mean r_k"),
    ("actor/grad_norm", "grad norm"),
)


def diagnostics_table(train_metrics: dict[str, list[dict]]) -> str:
    """Training metrics per run, as mean over steps (first -> last step for the response length)."""
    head = "| run | " + " | ".join(label for _, label in DIAGNOSTICS) + " | resp tok first -> last |"
    lines = [head, "|---" * (len(DIAGNOSTICS) + 2) + "|"]
    for key, steps in train_metrics.items():
        cells = []
        for metric, _ in DIAGNOSTICS:
            vals = [s[metric] for s in steps if s.get(metric) is not None]
            cells.append(f"{statistics.fmean(vals):.3g}" if vals else "-")
        lengths = [s.get("response_length/mean") for s in steps]
        trend = f"{lengths[0]:.1f} -> {lengths[-1]:.1f}" if lengths and None not in lengths else "-"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {trend} |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, dict[str, Any]], curves: dict[str, list[list[dict]]], out: Path) -> list[Path]:
    """accuracy-vs-tokens, budget accuracy, Acc(k) per tier and training curves, as small PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    for name, a in agg.items():
        ax.errorbar(
            a["mean_tokens"]["mean"], a["accuracy"]["mean"],
            xerr=a["mean_tokens"]["std"], yerr=a["accuracy"]["std"], fmt="o", capsize=3, label=name,
        )  # fmt: skip
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("pass@1 (held-out)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_tokens.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    for name, a in agg.items():
        budgets = [int(b) for b in a["budget_accuracy"]]
        ax.errorbar(
            budgets, [a["budget_accuracy"][str(b)]["mean"] for b in budgets],
            yerr=[a["budget_accuracy"][str(b)]["std"] for b in budgets], marker="o", capsize=2, label=name,
        )  # fmt: skip
    ax.set_xlabel("token budget B")
    ax.set_ylabel("accuracy within B tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "budget_accuracy.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    names = list(agg)
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.6 * len(names), 2.8), dpi=100, sharey=True, squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        for tier, bt in sorted(agg[name]["by_tier"].items()):
            ax.plot(range(len(bt["acc_k"])), bt["acc_k"], marker=".", label=f"tier {tier}")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("episodes k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Acc(k): answer forced after k")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "acc_by_depth.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for name, runs in curves.items():
        for key, ax in zip(("response_length/mean", "critic/score/mean"), axes, strict=True):
            steps = [[m.get(key) for m in run] for run in runs if run]
            if not steps:
                continue
            depth = min(len(s) for s in steps)
            mean = [statistics.fmean(s[i] for s in steps if s[i] is not None) for i in range(depth)]
            ax.plot(range(1, depth + 1), mean, label=name)
            ax.set_title(f"{key} (training, mean over seeds)", fontsize=8)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "training_curves.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The warm start logs its SFT loss every 100 steps: the only sign of life during the asset build.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    from l2t_verl.assets import build_all

    t0 = time.perf_counter()
    print(f"[efficiency] assets in {args.out / 'assets'}", flush=True)
    paths = build_all(
        args.out / "assets",
        seed=args.assets_seed,
        train_size=args.train_size,
        val_size=args.eval_size,
        sft_steps=args.sft_steps,
        sft_redundant_max=args.sft_redundant_max,
        sft_redundant_per_gap=args.sft_redundant_per_gap,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
    )
    validation = validation_split(paths, args)
    timings["assets_s"] = round(time.perf_counter() - t0, 1)

    signal: dict[str, Any] | None = None
    if args.signal_steps and not args.report_only:
        from benchmarks.efficiency.signal import main as signal_main

        t0 = time.perf_counter()
        signal_out = args.out / "signal"
        if not (signal_out / "signal.json").exists():
            signal_main(
                ["--assets", str(paths["root"]), "--out", str(signal_out), "--steps", str(args.signal_steps)]
                + ["--max-response", str(args.max_response), "--seed", str(args.assets_seed)]
            )
        signal = json.loads((signal_out / "signal.json").read_text())
        timings["signal_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"[efficiency] signal: dJ necessary - redundant = {signal['diff']} {signal['diff_ci95']}",
            flush=True,
        )

    runs = plan(args)
    records = []
    t0 = time.perf_counter()
    for run in runs:
        if args.report_only:
            hf = args.out / "runs" / run.key / "ckpt" / f"global_step_{args.steps}" / "actor" / "huggingface"
            if not hf.joinpath("config.json").exists():
                continue
            timing = args.out / "runs" / run.key / "wall_s.json"
            extra = json.loads(timing.read_text()) if timing.exists() else {}
            records.append({"key": run.key, "name": run.name, "seed": run.seed, "hf_dir": str(hf), **extra})
        else:
            records.append(train(run, args, paths["root"]))
    timings["train_s"] = round(time.perf_counter() - t0, 1)

    import pandas as pd
    from transformers import AutoTokenizer

    from benchmarks.efficiency.evaluate import evaluate_checkpoint

    # torch's own default (all cores, or OMP_NUM_THREADS): on a CPU shared with other jobs, set
    # OMP_NUM_THREADS=1, since spinning OpenMP threads waste most of their time when descheduled.
    tokenizer = AutoTokenizer.from_pretrained(str(paths["model"]))
    rows = pd.read_parquet(paths["test"] if args.eval_split == "test" else validation).to_dict("records")
    t0 = time.perf_counter()
    evals: dict[str, list[dict]] = {}
    per_run: dict[str, Any] = {}

    def _eval(name: str, key: str, model_dir: str, seed: int) -> None:
        res = evaluate_checkpoint(
            model_dir, tokenizer, rows, samples=args.eval_samples, seed=seed, max_new_tokens=args.max_response
        )
        evals.setdefault(name, []).append(res)
        per_run[key] = res
        print(
            f"[efficiency] eval {key}: acc {res['accuracy']:.3f}, tokens {res['mean_tokens']:.1f}", flush=True
        )

    # The warm start is sampled with every training seed's eval seed, so its row has a spread too.
    for seed in _ints(args.seeds):
        _eval("warm_start", f"warm_start_s{seed}", str(paths["model"]), seed)
    for rec in records:
        _eval(rec["name"], rec["key"], rec["hf_dir"], rec["seed"])
    timings["eval_s"] = round(time.perf_counter() - t0, 1)

    curves: dict[str, list[list[dict]]] = {}
    train_metrics: dict[str, Any] = {}
    for rec in records:
        steps = read_metrics(args.out / "runs" / rec["key"] / "metrics.jsonl")
        curves.setdefault(rec["name"], []).append(steps)
        train_metrics[rec["key"]] = steps

    agg = aggregate(evals)
    methods = method_summary(per_run, records, _ints(args.seeds))
    targets = verdict(methods)
    table = (
        verdict_table(targets, methods)
        + markdown_table(agg)
        + "\nTraining diagnostics (mean over steps):\n\n"
        + diagnostics_table(train_metrics)
    )
    plots = plot(agg, curves, args.out / "plots")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": records,
        "timings": timings,
        "aggregate": agg,
        "per_run": per_run,
        "train_metrics": train_metrics,
        "plots": [str(p) for p in plots],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    summary = {
        "command": " ".join(
            ["python", "-m", "benchmarks.efficiency.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "wall_s": timings["total_s"],
        "eval_split": args.eval_split,
        "methods": methods,
        "signal": None
        if signal is None
        else {k: signal[k] for k in ("dj_necessary", "dj_redundant")} | {"diff_ci95": signal["diff_ci95"]},
        "verdict": targets,
    }
    for path in [args.out / "summary.json", *([args.summary] if args.summary else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "table.md").write_text(table)
    print(table)
    print(f"[efficiency] done in {timings['total_s']:.0f} s: {args.out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
