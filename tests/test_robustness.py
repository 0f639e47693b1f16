"""Robustness inside real CPU training runs (docs/method.md §8): injected faults over a 30-step soak, and
checkpoint/resume of the L2T state. The exact multi-rank check is in test_multirank.py."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest
from trainer_run import brief, run_trainer

FIXTURES = Path(__file__).parent / "fixtures"
SOAK_STEPS = 30


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of the trainer and everything it started (Ray's raylet, workers, servers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.e2e
def test_soak_with_injected_faults(e2e_assets, tmp_path):
    """30 steps while the verifier raises or hangs, probe requests fail and penalties come out NaN:
    every fault is counted, no step is lost, and memory and step time stay flat."""
    rss: dict[int, int] = {}

    def sample(proc, steps) -> None:
        if steps and len(steps) not in rss:
            rss[len(steps)] = _tree_rss_bytes(proc.pid)

    steps = run_trainer(
        e2e_assets,
        tmp_path,
        "l2t",
        SOAK_STEPS,
        "data.train_batch_size=2",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        f"reward.custom_reward_function.path={FIXTURES / 'faulty_verifier.py'}",
        "+reward.timeout=2",
        env={"L2T_FAULTS": "probe=0.1,penalty_nan=0.15"},
        on_poll=sample,
    )
    assert len(steps) == SOAK_STEPS
    totals = Counter()
    for step in steps:
        for key in ("l2t/verifier_errors", "l2t/probe_failures", "l2t/penalty_nonfinite"):
            totals[key] += step[key]
        for key in ("actor/grad_norm", "actor/pg_loss", "critic/score/mean", "l2t/penalty_mean"):
            assert math.isfinite(step[key]), (key, step["training/global_step"])
    assert all(totals[k] > 0 for k in totals), totals

    times = [step["timing_s/step"] for step in steps]
    # Lower quartiles, not medians: a step whose verifier hangs waits the 2 s reward timeout, and
    # about 40% of steps have one, so a median flips between the two levels by chance. Growth in
    # the cost of a step shows in its fast steps as much as in the slow ones.
    early = statistics.quantiles(times[5:15], n=4)[0]
    late = statistics.quantiles(times[20:30], n=4)[0]
    mem_early = rss.get(10, 0)
    mem_late = max(v for k, v in rss.items() if k >= 20)
    report = {
        "steps": SOAK_STEPS,
        "faults": dict(totals),
        "step_time_lower_quartile_s": {"steps_6_15": early, "steps_21_30": late},
        "rss_gb": {str(k): round(v / 2**30, 3) for k, v in sorted(rss.items())},
    }
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=2))
    print("soak:", json.dumps(report))
    assert late / early < 1.5, report
    assert mem_early > 0 and mem_late / mem_early < 1.15, report


def _records(dump: Path, step: int) -> dict[str, list[dict]]:
    by_seq: dict[str, list[dict]] = {}
    for line in (dump / f"step_{step}.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_seq.setdefault(record["sequence_sha1"], []).append(record)
    return by_seq


@pytest.mark.e2e
def test_resume_restores_the_penalty_reference(e2e_assets, tmp_path):
    """A run resumed from its step-2 checkpoint computes step 3 exactly as the uninterrupted run:
    the same responses (deterministic sampling) and the same penalties, which needs the penalty's
    reference weights (P before step 2's update) back from the checkpoint. Without them step 3's
    penalty would be 0 (no reference yet) or measured from the wrong origin."""
    deterministic = "actor_rollout_ref.rollout.full_determinism=true"
    full = run_trainer(
        e2e_assets,
        tmp_path / "full",
        "l2t",
        3,
        deterministic,
        "trainer.save_freq=2",
        f"l2t.dump_dir={tmp_path / 'full' / 'dump'}",
    )
    checkpoint = tmp_path / "full" / "ckpt" / "global_step_2"
    assert (checkpoint / "actor" / "l2t_state.pt").exists()
    resumed = run_trainer(
        e2e_assets,
        tmp_path / "resumed",
        "l2t",
        3,
        deterministic,
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={checkpoint}",
        f"l2t.dump_dir={tmp_path / 'resumed' / 'dump'}",
    )
    assert [s["training/global_step"] for s in resumed] == [3], brief(resumed, ("training/global_step",))
    assert resumed[0]["l2t/penalty_raw_mean"] > 0
    assert resumed[0]["l2t/penalty_raw_mean"] == pytest.approx(full[2]["l2t/penalty_raw_mean"], rel=1e-4)

    a, b = _records(tmp_path / "full" / "dump", 3), _records(tmp_path / "resumed" / "dump", 3)
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}, "different responses"
    for key, records in a.items():
        for x, y in zip(records, b[key], strict=True):
            assert x["episode_ends"] == y["episode_ends"]
            assert y["penalty_raw"] == pytest.approx(x["penalty_raw"], rel=1e-4, abs=1e-12)
            assert y["advantages"] == pytest.approx(x["advantages"], rel=1e-3, abs=1e-4)


# ---------------------------------------------------------------- start-up faults (no Ray, seconds)


def _start(tmp_path: Path, *overrides: str, data: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m l2t_verl.main`` as a user runs it; these faults must stop it before Ray starts."""
    from l2t_verl.arith_task import make_problems, write_dataset

    if data is None:
        data = tmp_path / "train.parquet"
        write_dataset(make_problems(4, 0), data)
    cmd = [
        sys.executable,
        "-m",
        "l2t_verl.main",
        "preset=cpu",
        "algo=l2t",
        f"data.train_files={data}",
        f"data.val_files={data}",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("l2t.beta=-1", "l2t.beta"),
        ("actor_rollout_ref.rollout.temperature=0", "actor_rollout_ref.rollout.temperature"),
    ],
)
@pytest.mark.slow
def test_bad_configuration_stops_with_one_line(tmp_path, override, key):
    # Every key's check is unit-tested in test_validation.py; this is the path a user hits.
    proc = _start(tmp_path, override)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("l2t-verl: configuration error")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_malformed_dataset_row_is_named_before_training(tmp_path):
    import pandas as pd

    from l2t_verl.arith_task import make_problems, write_dataset

    rows = make_problems(5, 0)
    rows[3]["reward_model"] = {"style": "rule", "ground_truth": ""}
    bad = tmp_path / "bad.parquet"
    write_dataset(rows, bad)
    assert len(pd.read_parquet(bad)) == 5
    proc = _start(tmp_path, data=bad)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "row 3" in last and "ground_truth" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
