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
