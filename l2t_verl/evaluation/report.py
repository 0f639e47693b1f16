"""Writing evaluation results to disk (JSON, JSONL, CSV, PNG) and comparing several runs.

A run directory written by :func:`write_report` holds:

- ``result.json``: config, summaries (overall / per dataset / per tier), depth curves, timing;
- ``samples.jsonl``: one :class:`SampleRecord` per line (response text, score, budget and depth data);
- ``metrics.csv`` (one row per group: ``all``, ``dataset:NAME``, ``tier:T``), ``budgets.csv``,
  ``depth.csv``;
- ``accuracy_vs_budget.png`` (when budgets were evaluated) and ``depth.png`` (Acc(k) and T(k) per
  tier, when the depth analysis ran).

:func:`compare` puts several runs side by side: ``comparison.csv`` / ``comparison.md`` (one row per
run, token use relative to the first run as in the paper's Fig. 2), ``comparison.json`` and
``comparison.png`` (accuracy vs mean tokens, accuracy vs budget, Acc(k) vs k).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from l2t_verl.evaluation.errors import EvaluationError
from l2t_verl.evaluation.result import ALL, EvalResult, SampleRecord

__all__ = [
    "compare",
    "comparison_rows",
    "load_result",
    "plot_budgets",
    "plot_comparison",
    "plot_depth",
    "write_report",
]

RESULT_FILE = "result.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_COLUMNS = (
    "problems",
    "samples",
    "pass@1",
    "maj@4",
    "mean_tokens",
    "p50_tokens",
    "p90_tokens",
    "p95_tokens",
    "max_tokens",
    "mean_tokens_correct",
    "truncated_rate",
    "verifier_errors",
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display, safe in workers and CI
    import matplotlib.pyplot as plt

    return plt


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return round(value, 6)
    return value


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[_cell(v) for v in row] for row in rows])
    return path


def _maj_key(result: EvalResult) -> str:
    return f"maj@{result.config.get('maj_k', 4)}"


def _groups(result: EvalResult) -> list[tuple[str, dict[str, Any]]]:
    return (
        [(ALL, result.overall)]
        + [(f"dataset:{k}", v) for k, v in result.by_dataset.items()]
        + [(f"tier:{k}", v) for k, v in result.by_tier.items()]
    )


def plot_budgets(results: Mapping[str, EvalResult], path: str | Path, title: str | None = None) -> Path:
    """Accuracy vs token budget, one line per run (paper Fig. 3)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        points = result.overall.get("budgets") or []
        if points:
            ax.plot([p["budget"] for p in points], [p["accuracy"] for p in points], marker="o", label=name)
    ax.set_xlabel("token budget")
    ax.set_ylabel("accuracy (pass@1 under budget)")
    ax.set_title(title or "Accuracy vs token budget")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_depth(result: EvalResult, path: str | Path) -> Path:
    """Acc(k) and T(k) vs episode depth k, one line per tier plus all (paper Fig. 1)."""
    plt = _pyplot()
    fig, (ax_acc, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    for tier, curve in result.depth.items():
        if not curve:
            continue
        ks = [p["k"] for p in curve]
        style = {"color": "black", "linewidth": 2} if tier == ALL else {}
        label = "all" if tier == ALL else f"tier {tier}"
        ax_acc.plot(ks, [p["acc"] for p in curve], marker=".", label=label, **style)
        ax_tok.plot(ks, [p["tokens"] for p in curve], marker=".", label=label, **style)
    ax_acc.set_xlabel("episode depth k")
    ax_acc.set_ylabel("Acc(k)")
    ax_acc.set_title(f"{result.name}: accuracy when forced to answer after k episodes")
    ax_tok.set_xlabel("episode depth k")
    ax_tok.set_ylabel("T(k): mean response tokens")
    ax_tok.set_title("tokens spent up to depth k")
    for ax in (ax_acc, ax_tok):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write every file of the module docstring that applies; return them by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["result"] = out / RESULT_FILE
    files["result"].write_text(json.dumps(result.to_dict(with_samples=False), indent=2, default=str) + "\n")
    files["samples"] = out / SAMPLES_FILE
    with files["samples"].open("w") as f:
        for s in result.samples:
            f.write(json.dumps(s.to_dict(), default=str) + "\n")
    maj = _maj_key(result)
    columns = [maj if c == "maj@4" else c for c in SUMMARY_COLUMNS]
    files["metrics"] = _write_csv(
        out / "metrics.csv",
        ["group", *columns],
        [[g, *(m.get(c) for c in columns)] for g, m in _groups(result)],
    )
    budget_rows = [
        [g, p["budget"], p["accuracy"], p["mean_tokens"], p["forced_rate"]]
        for g, m in _groups(result)
        for p in m.get("budgets") or []
    ]
    if budget_rows:
        files["budgets"] = _write_csv(
            out / "budgets.csv", ["group", "budget", "accuracy", "mean_tokens", "forced_rate"], budget_rows
        )
        files["budget_plot"] = plot_budgets({result.name: result}, out / "accuracy_vs_budget.png")
    if any(result.depth.values()):
        files["depth"] = _write_csv(
            out / "depth.csv",
            ["tier", "k", "acc", "tokens", "acc_reached", "n_reached", "n"],
            [
                [tier, p["k"], p["acc"], p["tokens"], p["acc_reached"], p["n_reached"], p["n"]]
                for tier, curve in result.depth.items()
                for p in curve
            ],
        )
        files["depth_plot"] = plot_depth(result, out / "depth.png")
    return files


def load_result(run_dir: str | Path, with_samples: bool = True) -> EvalResult:
    """Read a run directory written by :func:`write_report` (``result.json`` + ``samples.jsonl``)."""
    run = Path(run_dir)
    path = run / RESULT_FILE
    if not path.is_file():
        raise EvaluationError(f"{run}: not an evaluation run directory (no {RESULT_FILE})")
    try:
        data = json.loads(path.read_text())
        result = EvalResult.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise EvaluationError(f"{path}: unreadable evaluation result ({exc})") from None
    samples = run / SAMPLES_FILE
    if with_samples and samples.is_file():
        with samples.open() as f:
            result.samples = [SampleRecord.from_dict(json.loads(line)) for line in f if line.strip()]
    return result


def comparison_rows(results: Mapping[str, EvalResult]) -> list[dict[str, Any]]:
    """One row per run: accuracy, tokens, tokens relative to the first run, accuracy at each budget."""
    if not results:
        raise EvaluationError("compare needs at least one run")
    budgets = sorted({int(p["budget"]) for r in results.values() for p in r.overall.get("budgets") or []})
    reference = next(iter(results.values())).overall.get("mean_tokens")
    rows = []
    for name, r in results.items():
        o = r.overall
        row: dict[str, Any] = {
            "run": name,
            "model": r.model,
            "problems": o.get("problems"),
            "samples": o.get("samples"),
            "pass@1": o.get("pass@1"),
            _maj_key(r): o.get(_maj_key(r)),
            "mean_tokens": o.get("mean_tokens"),
            "p90_tokens": o.get("p90_tokens"),
            "mean_tokens_correct": o.get("mean_tokens_correct"),
            "relative_tokens": (o["mean_tokens"] / reference) if reference else None,
        }
        accuracy = r.budget_accuracy()
        for b in budgets:
            row[f"acc@{b}"] = accuracy.get(b)
        rows.append(row)
    return rows


def plot_comparison(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """Side by side: pass@1 vs mean tokens, accuracy vs budget, and Acc(k) vs k (all tiers)."""
    plt = _pyplot()
    has_budgets = any(r.overall.get("budgets") for r in results.values())
    has_depth = any(r.depth.get(ALL) for r in results.values())
    panels = 1 + has_budgets + has_depth
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    for name, r in results.items():
        ax.scatter([r.overall["mean_tokens"]], [r.overall["pass@1"]], s=50, label=name)
        ax.annotate(
            name,
            (r.overall["mean_tokens"], r.overall["pass@1"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("pass@1")
    ax.set_title("accuracy vs tokens spent")
    ax.grid(alpha=0.3)
    if has_budgets:
        ax = axes.pop(0)
        for name, r in results.items():
            points = r.overall.get("budgets") or []
            if points:
                ax.plot(
                    [p["budget"] for p in points], [p["accuracy"] for p in points], marker="o", label=name
                )
        ax.set_xlabel("token budget")
        ax.set_ylabel("accuracy under budget")
        ax.set_title("accuracy vs token budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_depth:
        ax = axes.pop(0)
        for name, r in results.items():
            curve = r.depth.get(ALL) or []
            if curve:
                ax.plot([p["k"] for p in curve], [p["acc"] for p in curve], marker=".", label=name)
        ax.set_xlabel("episode depth k")
        ax.set_ylabel("Acc(k)")
        ax.set_title("accuracy vs episode depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    header = list(rows[0])

    def fmt(v: Any) -> str:
        v = _cell(v)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(row.get(h)) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare(
    results: Mapping[str, EvalResult] | Sequence[EvalResult], out_dir: str | Path
) -> list[dict[str, Any]]:
    """Write the comparison files of the module docstring for ``results`` (name -> result, or a list
    named by each result's ``name``); the first run is the token reference. Returns the table rows."""
    if not isinstance(results, Mapping):
        named: dict[str, EvalResult] = {}
        for r in results:
            key, k = r.name, 2
            while key in named:
                key, k = f"{r.name}#{k}", k + 1
            named[key] = r
        results = named
    rows = comparison_rows(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = list(dict.fromkeys(h for row in rows for h in row))
    _write_csv(out / "comparison.csv", header, [[row.get(h) for h in header] for row in rows])
    (out / "comparison.md").write_text(_markdown([{h: row.get(h) for h in header} for row in rows]))
    (out / "comparison.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "budgets": {n: r.overall.get("budgets") or [] for n, r in results.items()},
                "depth": {n: r.depth for n, r in results.items()},
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    plot_comparison(results, out / "comparison.png")
    return rows
