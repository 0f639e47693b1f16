"""End to end: verl's real v1 trainer (Ray, FSDP2 engine, agent loop, reward loop, TransferQueue) on CPU.

Each test launches ``python -m l2t_verl.main preset=cpu`` in a subprocess, exactly as the quickstart
does, and reads the metrics verl's file logger wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from l2t_verl.assets import build_all, make_problems, write_dataset

    out = tmp_path_factory.mktemp("e2e_assets")
    paths = build_all(out, seed=0, train_size=64, val_size=8)
    # Train on 2-3-step problems only: the warm-started model solves a good share of them, so that
    # almost every prompt group has mixed 0/1 outcomes and a non-zero GRPO advantage. On the full
    # 1-6-step mix a 4x4 batch is too often all wrong, which zeroes the gradient by chance.
    test_prompts = [p[0]["content"] for p in pd.read_parquet(paths["test"])["prompt"]]
    write_dataset(make_problems(64, 0, 2, 3, split="train", exclude=test_prompts), paths["train"])
    return out


def run_trainer(assets: Path, out: Path, algo: str, steps: int, *overrides: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics), RAY_DEDUP_LOGS="0")
    cmd = [
        sys.executable,
        "-m",
        "l2t_verl.main",
        "preset=cpu",
        f"algo={algo}",
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
        *overrides,
    ]
    log = out / "train.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=out, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        pytest.fail(f"trainer exited with {proc.returncode}; log tail:\n{tail}")
    return [json.loads(line)["data"] for line in metrics.read_text().splitlines() if line.strip()]


def _brief(steps: list[dict]) -> str:
    """The metrics a failed assertion needs, one line per step (CI shows only the assertion)."""
    keys = ("critic/score/mean", "actor/grad_norm", "critic/advantages/max", "critic/advantages/min")
    return "\n".join(str({k: step.get(k) for k in keys}) for step in steps)


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_grpo_trains_on_cpu(assets, tmp_path):
    steps = run_trainer(assets, tmp_path, "grpo", 2)
    assert len(steps) == 2
    for step in steps:
        assert "critic/score/mean" in step  # the reward loop scored every response
        assert 0.0 <= step["critic/score/mean"] <= 1.0
    assert any(step["actor/grad_norm"] > 0 for step in steps), _brief(steps)
    before = _hf_weights(assets / "model")
    after = _hf_weights(tmp_path / "ckpt" / "global_step_2" / "actor" / "huggingface")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert changed, "no weight changed after two optimizer steps"


def test_l2t_trains_on_cpu_with_probes_and_penalty(assets, tmp_path):
    steps = run_trainer(assets, tmp_path, "l2t", 3)
    assert len(steps) == 3
    for step in steps:
        assert step["l2t/episodes_per_response/mean"] > 1.0
        assert step["l2t/probe_failures"] == 0
        assert step["l2t/probe_tokens_per_response"] > 0
        assert 0.0 < step["l2t/jr_first"] <= 1.0
        assert step["l2t/delta_jr_mean"] != 0.0
        assert step["l2t/penalty_nonfinite"] == 0
    # reference = previous step: no update before step 1, so its penalty is exactly zero
    assert steps[0]["l2t/penalty_raw_mean"] == 0.0
    assert all(step["l2t/penalty_raw_mean"] > 0.0 for step in steps[1:])
    # From step 2 on the penalty makes the process rewards differ, so the gradient cannot vanish
    # even when every outcome of a group is equal.
    assert all(step["actor/grad_norm"] > 0 for step in steps[1:]), _brief(steps)
    before = _hf_weights(assets / "model")
    after = _hf_weights(tmp_path / "ckpt" / "global_step_3" / "actor" / "huggingface")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before if k in after)
