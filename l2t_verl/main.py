"""Entry point: ``python -m l2t_verl.main [preset=cpu] [hydra overrides...]``.

The same loop as ``python -m verl.trainer.main_ppo`` (verl's v1 TaskRunner, Ray, FSDP engine, agent and
reward loops), started from ``config/l2t_trainer.yaml``. The L2T pieces plug in through verl's registries
(see :mod:`l2t_verl.plugin`), so this file only fills in defaults and hands over.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict


def prepare_config(config: DictConfig) -> DictConfig:
    """Fill the defaults that depend on where l2t-verl is installed, then validate as verl does."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    with open_dict(config):
        if not config.reward.custom_reward_function.get("path"):
            config.reward.custom_reward_function.path = str(Path(__file__).parent / "scoring" / "__init__.py")
    auto_set_device(config)
    validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    return config


@hydra.main(config_path="config", config_name="l2t_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    if config.trainer.device == "cpu":
        # Must be set before Ray starts so that every worker resolves the same platform.
        os.environ.setdefault("VERL_PLATFORM", "cpu")
    run_ppo(prepare_config(config), task_runner_class=TaskRunnerV1)


if __name__ == "__main__":
    main()
