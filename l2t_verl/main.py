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


def check_method_combination(config: DictConfig, l2t) -> None:
    """Refuse the combinations that would run something other than what the config names, silently."""
    from l2t_verl.advantage import L2T_ADV_ESTIMATOR
    from l2t_verl.settings import L2TConfigError

    estimator = config.algorithm.get("adv_estimator")
    trainer_mode = config.trainer.get("v1", {}).get("trainer_mode")
    l2t_trainer = trainer_mode == L2T_ADV_ESTIMATOR
    if estimator == L2T_ADV_ESTIMATOR and not l2t_trainer:
        raise L2TConfigError(
            f"algorithm.adv_estimator=l2t needs trainer.v1.trainer_mode=l2t (got {trainer_mode}): only the "
            "L2T trainer computes the L2T advantage; use algo=l2t"
        )
    if l2t_trainer and estimator != L2T_ADV_ESTIMATOR:
        raise L2TConfigError(
            f"algorithm.adv_estimator must be l2t with trainer.v1.trainer_mode=l2t (got {estimator}): the "
            "L2T trainer always computes the L2T advantage; use algo=l2t"
        )
    if not l2t_trainer:
        return
    n = int(config.actor_rollout_ref.rollout.get("n", 1))
    if n < 2:
        raise L2TConfigError(
            f"actor_rollout_ref.rollout.n must be >= 2 for L2T (its advantages are relative to the prompt "
            f"group); got {n}"
        )
    if config.algorithm.get("use_kl_in_reward", False):
        raise L2TConfigError(
            "algorithm.use_kl_in_reward is not supported by the L2T trainer; use "
            "actor_rollout_ref.actor.use_kl_loss=true for a KL term"
        )


def check_probe_target(config: DictConfig, l2t) -> None:
    """The likelihood probe's ``answer_suffix`` against the model's tokenizer (docs/method.md §2)."""
    import logging

    from l2t_verl.progress import check_answer_suffix

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            config.actor_rollout_ref.model.path,
            trust_remote_code=bool(config.actor_rollout_ref.model.get("trust_remote_code", False)),
        )
    except Exception as exc:  # a remote path verl copies later; the probes then run unchecked
        logging.getLogger("l2t_verl").warning(
            "l2t: could not load the tokenizer of %s to check l2t.progress.answer_suffix (%s)",
            config.actor_rollout_ref.model.path,
            exc,
        )
        return
    check_answer_suffix(tokenizer, l2t.progress.answer_suffix)


def prepare_config(config: DictConfig) -> DictConfig:
    """Fill install-dependent defaults and validate everything before a worker starts (docs/method.md §8):
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
    check_method_combination(config, l2t)
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
    if l2t.progress_active and l2t.progress.estimator == "likelihood":
        check_probe_target(config, l2t)
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
