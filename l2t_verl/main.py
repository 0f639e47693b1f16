"""Entry point: ``python -m l2t_verl.main [preset=cpu] [hydra overrides...]``.

The same loop as ``python -m verl.trainer.main_ppo`` (verl's v1 TaskRunner, Ray, FSDP engine, agent and
reward loops), started from ``config/l2t_trainer.yaml``. The L2T pieces plug in through verl's registries
(see :mod:`l2t_verl.plugin`), so this file only fills in defaults and hands over.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

PROBE_HEADROOM_TOKENS = 128


def prepare_config(config: DictConfig) -> DictConfig:
    """Fill install-dependent defaults and validate everything before a worker starts (spec 8):
    the ``l2t`` settings, the datasets (row by row), then verl's own checks."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from l2t_verl.dataset import validate_dataset
    from l2t_verl.length_penalty import check_length_penalty
    from l2t_verl.settings import L2TConfig, L2TConfigError

    with open_dict(config):
        if not config.reward.custom_reward_function.get("path"):
            config.reward.custom_reward_function.path = str(Path(__file__).parent / "scoring" / "__init__.py")
    l2t = L2TConfig.from_config(config)
    check_length_penalty(config)  # the length-penalty baseline's settings, when algo=length_penalty
    rollout = config.actor_rollout_ref.rollout
    if float(rollout.get("temperature", 1.0)) <= 0:
        # verl's actor divides the logits by the rollout temperature: 0 gives inf log-probs and
        # gradient norms of ~1e8 instead of an error. Greedy evaluation is val_kwargs.do_sample=false.
        raise L2TConfigError(
            f"actor_rollout_ref.rollout.temperature must be > 0 for training; got {rollout.temperature}"
        )
    if l2t.progress_active and rollout.get("max_model_len") is None:
        # A J_r probe is prompt + reasoning prefix + force suffix + answer: it can outgrow the
        # generation budget by the force suffix and the answer, so leave the server room for them.
        with open_dict(config):
            rollout.max_model_len = (
                config.data.max_prompt_length + config.data.max_response_length + PROBE_HEADROOM_TOKENS
            )
    for key in ("train_files", "val_files"):
        files = config.data.get(key)
        for path in [files] if isinstance(files, str) else list(files or []):
            validate_dataset(path, prompt_key=config.data.prompt_key)
    auto_set_device(config)
    validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    return config


@hydra.main(config_path="config", config_name="l2t_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    from l2t_verl.dataset import DatasetError
    from l2t_verl.settings import L2TConfigError

    if config.trainer.device == "cpu":
        # Must be set before Ray starts so that every worker resolves the same platform.
        os.environ.setdefault("VERL_PLATFORM", "cpu")
    try:
        config = prepare_config(config)
    except (L2TConfigError, DatasetError) as exc:
        sys.exit(f"l2t-verl: configuration error: {exc}")
    run_ppo(config, task_runner_class=TaskRunnerV1)


if __name__ == "__main__":
    main()
