"""Smoke-sized efficiency experiment: ``python -m benchmarks.efficiency.run --smoke`` end to end (asset
build, GRPO and L2T through verl's real trainer, held-out evaluation, table and plots)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def test_efficiency_smoke(tmp_path):
    out = tmp_path / "eff"
    cmd = [sys.executable, "-m", "benchmarks.efficiency.run", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_outputs(out)


def check_outputs(out: Path) -> None:
    """What a finished smoke run must have written, and how its numbers must relate."""
    result = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().count("| grpo |") == 3  # main, tier and budget tables
    for plot in result["plots"]:
        assert Path(plot).stat().st_size > 1000, plot

    agg = result["aggregate"]
    assert set(agg) == {"warm_start", "grpo", "l2t"}
    for name, a in agg.items():
        assert 0.0 <= a["accuracy"]["mean"] <= 1.0, name
        assert 0.0 <= a["mean_redundant_tokens"]["mean"] <= a["mean_tokens"]["mean"], name
        budgets = [a["budget_accuracy"][b]["mean"] for b in sorted(a["budget_accuracy"], key=int)]
        # A budget only removes right answers, and a bigger one removes fewer.
        assert budgets == sorted(budgets) and budgets[-1] <= a["accuracy"]["mean"] + 1e-9, name
        for tier, bt in a["by_tier"].items():
            assert bt["acc_k"] and all(0.0 <= v <= 1.0 for v in bt["acc_k"]), (name, tier)

    per_run = result["per_run"]
    assert set(per_run) == {"warm_start_s0", "grpo_s0", "l2t_s0"}
    for key, res in per_run.items():
        assert res["n_responses"] == sum(t["n"] for t in res["by_tier"].values()), key

    # Both methods trained for the requested steps, with the same batch, through the real trainer.
    metrics = result["train_metrics"]
    assert len(metrics["grpo_s0"]) == len(metrics["l2t_s0"]) == 2
    assert all("l2t/episodes_per_response/mean" in step for step in metrics["l2t_s0"])
    assert all(r["train_wall_s"] > 0 for r in result["runs"])

    # The machine-readable summary: one value per seed of each headline figure, and the verdict.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("python -m benchmarks.efficiency.run") and summary["wall_s"] > 0
    assert set(summary["methods"]) == set(agg)
    for name, m in summary["methods"].items():
        assert m["seeds"] == [0], name
        for key in ("pass_at_1", "tokens", "redundant_tokens", "necessary_episodes"):
            assert len(m[key]) == 1 and m[key][0] >= 0, (name, key)
    assert summary["methods"]["l2t"]["pass_at_1"] == [per_run["l2t_s0"]["accuracy"]]
    assert [t["target"] for t in summary["verdict"]][0] == "warm start pass@1 >= 0.5"


def test_verdict_frontier_and_paired_bootstrap():
    """The report's arithmetic on hand-made per-seed figures."""
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.efficiency.run import frontier_at, paired_bootstrap, verdict

    def method(acc, tokens, redundant, necessary):
        return {"seeds": [0, 1], "pass_at_1": acc, "tokens": tokens, "redundant_tokens": redundant,
                "necessary_episodes": necessary}  # fmt: skip

    methods = {
        "warm_start": method([0.80, 0.82], [72.0, 72.0], [34.0, 35.0], [2.5, 2.5]),
        "grpo": method([0.82, 0.84], [70.0, 68.0], [33.0, 31.0], [2.5, 2.5]),
        "l2t": method([0.83, 0.83], [45.0, 43.0], [8.0, 9.0], [2.4, 2.4]),
        "length_penalty@0.2": method([0.80, 0.80], [60.0, 60.0], [25.0, 25.0], [2.5, 2.5]),
        "length_penalty@1.0": method([0.60, 0.60], [40.0, 40.0], [10.0, 10.0], [2.0, 2.0]),
    }
    # L2T at 44 tokens: the frontier there is 0.6 + (0.8 - 0.6) * (44 - 40) / (60 - 40) = 0.64.
    assert frontier_at(methods, 44.0) == pytest.approx(0.64)
    assert frontier_at(methods, 30.0) is None and frontier_at(methods, 70.0) is None
    rows = {r["target"]: r for r in verdict(methods)}
    assert all(r["met"] for r in rows.values())
    assert rows["L2T tokens <= 0.70 x GRPO"]["value"] == pytest.approx(44 / 69)
    assert rows["L2T on or above the length-penalty frontier"]["value"] == pytest.approx(0.83 - 0.64)
    methods["l2t"]["tokens"] = [60.0, 60.0]
    assert not {r["target"]: r for r in verdict(methods)}["L2T tokens <= 0.70 x GRPO"]["met"]
    lo, hi = paired_bootstrap([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], draws=2000)
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert paired_bootstrap([0.5, 0.5], [0.25, 0.25]) == [0.25, 0.25]
