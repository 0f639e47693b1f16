"""Launching verl's real trainer from the tests through :mod:`l2t_verl.tiny_run`, as the quickstart
does, and reading back the metrics verl's file logger wrote."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from l2t_verl import tiny_run


def build_e2e_assets(out: Path) -> Path:
    """The offline assets, trained on 2-3-step problems only: the warm-started model solves a good
    share of them, so almost every prompt group has mixed 0/1 outcomes and a non-zero GRPO advantage.
    On the full 1-6-step mix a 4x4 batch is too often all wrong, which zeroes the gradient by chance."""
    from l2t_verl.arith_task import make_problems, write_dataset
    from l2t_verl.assets import build_all

    paths = build_all(out, seed=0, train_size=64, val_size=8)
    test_prompts = [p[0]["content"] for p in pd.read_parquet(paths["test"])["prompt"]]
    write_dataset(make_problems(64, 0, 2, 3, split="train", exclude=test_prompts), paths["train"])
    return out


def run_trainer(
    assets: Path,
    out: Path,
    algo: str,
    steps: int,
    *overrides: str,
    env: dict[str, str] | None = None,
    on_poll: Callable[[subprocess.Popen, list[dict]], None] | None = None,
) -> list[dict]:
    """Run the trainer to completion (4 prompts x 4 samples per step) and return one metrics dict per
    step. An override replaces the harness's setting of the same key. ``on_poll(proc, steps)`` is called
    about twice a second while it runs (the soak test samples memory there)."""
    cmd = tiny_run.command(
        assets,
        out,
        algo,
        steps,
        batch=4,
        n=4,
        checkpoint_dir=out / "ckpt",
        # No weight decay: AdamW would change the weights even with a zero gradient, and the tests
        # must see that the policy gradient itself moved them.
        overrides=["actor_rollout_ref.actor.optim.weight_decay=0.0", *overrides],
    )
    try:
        finished = tiny_run.run(cmd, out, cwd=out, env=env, timeout_s=1200, on_poll=on_poll, check=False)
    except TimeoutError as exc:
        pytest.fail(str(exc))
    if finished.returncode != 0:
        pytest.fail(f"trainer exited with {finished.returncode}; log tail:\n{finished.log_tail(60)}")
    return finished.steps()


def brief(steps: list[dict], keys: tuple[str, ...] = ()) -> str:
    """The metrics a failed assertion needs, one line per step (CI shows only the assertion)."""
    keys = keys or ("critic/score/mean", "actor/grad_norm", "critic/advantages/max", "critic/advantages/min")
    return "\n".join(str({k: step.get(k) for k in keys}) for step in steps)
