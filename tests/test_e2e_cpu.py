"""End to end: verl's real v1 trainer (Ray, FSDP2 engine, agent loop, reward loop, TransferQueue) on CPU.

Each test launches ``python -m l2t_verl.main preset=tiny task=arith`` in a subprocess through
:mod:`l2t_verl.tiny_run`, as the quickstart does, and reads the metrics verl's file logger wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_run import brief, run_trainer

pytestmark = pytest.mark.e2e


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_grpo_trains_on_cpu(e2e_assets, tmp_path):
    steps = run_trainer(e2e_assets, tmp_path, "grpo", 2)
    assert len(steps) == 2
    for step in steps:
        assert "critic/score/mean" in step  # the reward loop scored every response
        assert 0.0 <= step["critic/score/mean"] <= 1.0
    assert any(step["actor/grad_norm"] > 0 for step in steps), brief(steps)
    before = _hf_weights(e2e_assets / "model")
    after = _hf_weights(tmp_path / "ckpt" / "global_step_2" / "actor" / "huggingface")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert changed, "no weight changed after two optimizer steps"


def test_l2t_trains_on_cpu_with_probes_and_penalty(e2e_assets, tmp_path):
    steps = run_trainer(e2e_assets, tmp_path, "l2t", 3)
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
    # verl runs it as its synchronous loop (trainer_mode "sync" to verl's branches), not as an async
    # mode, which would e.g. shrink the generation batch to one prompt.
    assert "gen_batch_size defaulted to 1" not in (tmp_path / "train.log").read_text()
    assert all(step["l2t/penalty_raw_mean"] > 0.0 for step in steps[1:])
    # From step 2 on the penalty makes the process rewards differ, so the gradient cannot vanish
    # even when every outcome of a group is equal.
    assert all(step["actor/grad_norm"] > 0 for step in steps[1:]), brief(steps)
    before = _hf_weights(e2e_assets / "model")
    after = _hf_weights(tmp_path / "ckpt" / "global_step_3" / "actor" / "huggingface")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before if k in after)
