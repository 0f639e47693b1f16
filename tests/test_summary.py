"""The end-of-run summary (``l2t_verl.summary``): its warning when too many responses lost their process
reward to failed J_r probes (docs/method.md §8)."""

from __future__ import annotations

import json
from pathlib import Path

from l2t_verl.summary import probe_failure_warning, summarize


def write_metrics(path: Path, steps: list[dict]) -> Path:
    """verl's file logger format: one ``{"step": N, "data": {...}}`` line per step."""
    path.write_text("".join(json.dumps({"step": i + 1, "data": data}) + "\n" for i, data in enumerate(steps)))
    return path


def l2t_step(responses: int, failures: int, **extra: float) -> dict:
    return {"critic/score/mean": 0.5, "l2t/responses": responses, "l2t/probe_failures": failures, **extra}


def test_summary_warns_when_more_than_5_percent_of_responses_lost_their_probes(tmp_path):
    # 3 + 1 failed of 2 x 32 responses: 6.25% over the run, though the last step alone is at 3%
    path = write_metrics(tmp_path / "metrics.jsonl", [l2t_step(32, 3), l2t_step(32, 1)])
    text = summarize(path)
    warning = text.splitlines()[-1]
    assert warning.startswith("WARNING: 4 of 64 responses (6.2%) got the outcome reward only")
    assert "l2t/probe_failures" in warning and "timeout_per_probe_s" in warning


def test_summary_is_silent_at_or_below_5_percent(tmp_path):
    at_limit = write_metrics(tmp_path / "limit.jsonl", [l2t_step(40, 3), l2t_step(40, 1)])  # exactly 5%
    assert "WARNING" not in summarize(at_limit)
    clean = write_metrics(tmp_path / "clean.jsonl", [l2t_step(32, 0)] * 3)
    assert "WARNING" not in summarize(clean)
    grpo = write_metrics(tmp_path / "grpo.jsonl", [{"critic/score/mean": 0.5}] * 2)  # no l2t/ metrics at all
    assert "WARNING" not in summarize(grpo)
    assert probe_failure_warning([]) is None


def test_summary_counts_prefix_cache_fallbacks(tmp_path):
    steps = [
        l2t_step(32, 0, **{"l2t/probe_cache_fallbacks": 5}),
        l2t_step(32, 0, **{"l2t/probe_cache_fallbacks": 2}),
    ]
    text = summarize(write_metrics(tmp_path / "metrics.jsonl", steps))
    assert "probe fallbacks : 7 probes scored again without the prefix cache" in text
    assert "probe fallbacks" not in summarize(write_metrics(tmp_path / "none.jsonl", [l2t_step(32, 0)]))
