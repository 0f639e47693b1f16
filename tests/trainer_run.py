"""Launching verl's real trainer (``python -m l2t_verl.main preset=cpu task=arith``) from the tests,
exactly as the quickstart does, and reading back the metrics verl's file logger wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest


def build_e2e_assets(out: Path) -> Path:
    """The offline assets, trained on 2-3-step problems only: the warm-started model solves a good
    share of them, so almost every prompt group has mixed 0/1 outcomes and a non-zero GRPO advantage.
    On the full 1-6-step mix a 4x4 batch is too often all wrong, which zeroes the gradient by chance."""
    from l2t_verl.assets import build_all, make_problems, write_dataset

    paths = build_all(out, seed=0, train_size=64, val_size=8)
    test_prompts = [p[0]["content"] for p in pd.read_parquet(paths["test"])["prompt"]]
    write_dataset(make_problems(64, 0, 2, 3, split="train", exclude=test_prompts), paths["train"])
    return out


def trainer_command(assets: Path, out: Path, algo: str, steps: int, *overrides: str) -> list[str]:
    """The command line; an override replaces the default of the same key (Hydra rejects duplicates)."""
    overridden = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = [
        f"data.train_files={assets / 'data' / 'train.parquet'}",
        f"data.val_files={assets / 'data' / 'test.parquet'}",
        "data.train_batch_size=4",
        "data.max_prompt_length=96",
        "data.max_response_length=96",
        f"actor_rollout_ref.model.path={assets / 'model'}",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.optim.lr=5e-5",
        # No weight decay: AdamW would change the weights even with a zero gradient, and the tests
        # must see that the policy gradient itself moved them.
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={steps}",
        f"trainer.default_local_dir={out / 'ckpt'}",
        "trainer.logger=[console,file]",
    ]
    kept = [d for d in defaults if d.split("=", 1)[0] not in overridden]
    return [
        sys.executable,
        "-m",
        "l2t_verl.main",
        "preset=cpu",
        "task=arith",
        f"algo={algo}",
        *kept,
        *overrides,
    ]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line)["data"] for line in path.read_text().splitlines() if line.strip()]


def run_trainer(
    assets: Path,
    out: Path,
    algo: str,
    steps: int,
    *overrides: str,
    env: dict[str, str] | None = None,
    on_poll: Callable[[subprocess.Popen, list[dict]], None] | None = None,
) -> list[dict]:
    """Run the trainer to completion and return one metrics dict per step. ``on_poll(proc, steps)``
    is called about twice a second while it runs (the soak test samples memory there)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    full_env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics), RAY_DEDUP_LOGS="0", **(env or {}))
    log = out / "train.log"
    deadline = time.monotonic() + 1200
    with log.open("w") as fh:
        proc = subprocess.Popen(
            trainer_command(assets, out, algo, steps, *overrides),
            cwd=out,
            env=full_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"trainer ran past 1200 s; log: {log}")
            if on_poll is not None:
                on_poll(proc, read_metrics(metrics))
            time.sleep(0.5)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        pytest.fail(f"trainer exited with {proc.returncode}; log tail:\n{tail}")
    return read_metrics(metrics)


def brief(steps: list[dict], keys: tuple[str, ...] = ()) -> str:
    """The metrics a failed assertion needs, one line per step (CI shows only the assertion)."""
    keys = keys or ("critic/score/mean", "actor/grad_norm", "critic/advantages/max", "critic/advantages/min")
    return "\n".join(str({k: step.get(k) for k in keys}) for step in steps)
