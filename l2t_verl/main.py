"""Entry point: ``python -m l2t_verl.main [preset=cpu] [hydra overrides...]``.

The same loop as ``python -m verl.trainer.main_ppo`` (verl's v1 TaskRunner, Ray, FSDP engine, agent and
reward loops), started from ``config/l2t_trainer.yaml``. The L2T pieces plug in through verl's registries
(see :mod:`l2t_verl.plugin`), so this file only fills in defaults and hands over.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

PROBE_HEADROOM_TOKENS = 128
"""Model-length room left above prompt + response for the likelihood probes (force suffix + answer)."""
PROBE_HEADROOM_MARGIN_TOKENS = 8
"""Slack added to a sampling probe's counted need when ``max_model_len`` is filled in by default."""

# Keys whose value > 1 turns on Ulysses sequence parallelism in verl 0.9.1's FSDP engines (read only
# when the actor is on one: Megatron has its own sequence parallelism, along TP). The ref's
# are included: its engine lives in the actor's process, and verl's SP patch replaces the model
# classes' attention process-wide.
ULYSSES_KEYS = (
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size",
)
# Keys that replace the model's forward (and with it the output layer's log-softmax the penalty
# differentiates): Liger patches the Hugging Face model classes (FSDP engines only); verl's fused kernels
# patch the model's forward on both engines.
LIGER_KEY = "actor_rollout_ref.model.use_liger"
FUSED_KERNEL_KEYS = (LIGER_KEY, "actor_rollout_ref.model.use_fused_kernels")

# The actor's engine: model_engine=megatron (verl's megatron_actor.yaml) sets it to "megatron"; the
# FSDP engines to fsdp / fsdp2.
ACTOR_STRATEGY_KEY = "actor_rollout_ref.actor.strategy"
MEGATRON = "megatron"
MEGATRON_CP_KEY = "actor_rollout_ref.actor.megatron.context_parallel_size"
MEGATRON_VPP_KEY = "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size"

logger = logging.getLogger("l2t_verl")


class ModelFiles:
    """The model's tokenizer and config for the start-up checks, each loaded at most once.

    A path that cannot be loaded here (a remote path verl copies later) leaves the checks that need it
    skipped with a warning; a non-local path that failed once is not tried again, so an unreachable hub
    costs its retries once, not once per check.
    """

    def __init__(self, config: DictConfig) -> None:
        model = config.actor_rollout_ref.model
        self.path = str(model.path)
        self.trust_remote_code = bool(model.get("trust_remote_code", False))
        self._loaded: dict[str, Any] = {}
        self._unreachable = False

    def tokenizer(self, purpose: str) -> Any | None:
        from transformers import AutoTokenizer

        return self._load("tokenizer", AutoTokenizer, purpose)

    def model_config(self, purpose: str) -> Any | None:
        from transformers import AutoConfig

        return self._load("config", AutoConfig, purpose)

    def _load(self, what: str, loader: Any, purpose: str) -> Any | None:
        if what in self._loaded:
            return self._loaded[what]
        self._loaded[what] = None
        if self._unreachable:
            logger.warning("l2t: %s could not be reached; not done: %s", self.path, purpose)
            return None
        try:
            self._loaded[what] = loader.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            self._unreachable = not os.path.exists(os.path.expanduser(self.path))
            logger.warning("l2t: could not load the %s of %s to %s (%s)", what, self.path, purpose, exc)
        return self._loaded[what]


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


def check_probe_target(config: DictConfig, l2t, files: ModelFiles | None = None) -> None:
    """The likelihood probe's ``answer_suffix`` against the model's tokenizer (docs/method.md §2)."""
    from l2t_verl.probes import check_answer_suffix

    tokenizer = (files or ModelFiles(config)).tokenizer("check l2t.progress.answer_suffix")
    if tokenizer is not None:
        check_answer_suffix(tokenizer, l2t.progress.answer_suffix)


def on_megatron(config: DictConfig) -> bool:
    """Whether the actor trains on verl's Megatron engine (``model_engine=megatron``)."""
    return OmegaConf.select(config, ACTOR_STRATEGY_KEY, default=None) == MEGATRON


def check_penalty_engine(config: DictConfig, l2t) -> None:
    """The actor-engine features the penalty's own forward cannot run under (docs/method.md §3)."""
    from l2t_verl.settings import L2TConfigError

    if not l2t.penalty_active:
        return
    megatron = on_megatron(config)
    if megatron:
        check_megatron_penalty(config, l2t)
    else:
        for key in ULYSSES_KEYS:
            size = OmegaConf.select(config, key, default=1)
            if size is not None and int(size) > 1:
                raise L2TConfigError(
                    f"{key}={size} is not supported with the L2T penalty: it runs whole sequences through "
                    "a model patched for sequence-parallel all-to-alls; set it to 1 or "
                    "l2t.penalty.enable=false"
                )
    for key in FUSED_KERNEL_KEYS:
        if megatron and key == LIGER_KEY:
            continue  # Megatron's own layers: verl applies Liger on the FSDP engines only
        if OmegaConf.select(config, key, default=False):
            raise L2TConfigError(
                f"{key}=true is not supported with the L2T penalty: the kernels replace the model's "
                "forward and output layer, whose log-softmax the penalty differentiates; set it to false"
            )


def check_megatron_penalty(config: DictConfig, l2t) -> None:
    """What the penalty's Megatron backend (the reverse method through megatron-core: tensor, sequence
    and pipeline parallel) does not run: forward-mode AD, a proxy outside the last layer, context
    parallelism and interleaved (virtual) pipeline stages."""
    from l2t_verl.settings import L2TConfigError

    engine = f"on the Megatron engine ({ACTOR_STRATEGY_KEY}={MEGATRON})"
    penalty = l2t.penalty
    if penalty.method == "forward_ad":
        raise L2TConfigError(
            f"l2t.penalty.method=forward_ad is not supported {engine}: Megatron's layers have no "
            "forward-mode AD rules; use method=auto or reverse"
        )
    if penalty.proxy == "random_layers":
        raise L2TConfigError(
            f"l2t.penalty.proxy=random_layers is not supported {engine}: its penalty runs the reverse "
            "method, which needs the proxy set in the last decoder layer; use proxy=lowrank_svd, or "
            "STRATEGY=fsdp for the random-layers ablation"
        )
    cp = OmegaConf.select(config, MEGATRON_CP_KEY, default=1)
    if cp is not None and int(cp) > 1:
        raise L2TConfigError(
            f"{MEGATRON_CP_KEY}={cp} is not supported with the L2T penalty: its Megatron backend runs "
            "whole sequences on each rank, not context-parallel shards; set it to 1 or "
            "l2t.penalty.enable=false"
        )
    vpp = OmegaConf.select(config, MEGATRON_VPP_KEY, default=None)
    if vpp is not None and int(vpp) > 1:
        raise L2TConfigError(
            f"{MEGATRON_VPP_KEY}={vpp} is not supported with the L2T penalty: its Megatron backend runs "
            "one model chunk per pipeline stage; set it to null or l2t.penalty.enable=false"
        )


def check_proxy_target(config: DictConfig, l2t, files: ModelFiles | None = None) -> None:
    """The penalty's proxy set against the model's parameter names (on the meta device, no weights),
    so that a regex matching nothing stops the run here rather than at the first penalty call."""
    from l2t_verl.settings import L2TConfigError

    if not l2t.penalty_active:
        return
    penalty = l2t.penalty
    if penalty.method == "reverse" and penalty.proxy == "random_layers":
        raise L2TConfigError(
            "l2t.penalty.method=reverse cannot run with l2t.penalty.proxy=random_layers: reverse needs "
            "no attention layer after the proxy set, and every layer but the last has some after it; "
            "use method=forward_ad"
        )
    files = files or ModelFiles(config)
    model_config = files.model_config("check the l2t.penalty proxy set")
    if model_config is None:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from l2t_verl.penalty import proxy_regex

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=files.trust_remote_code)
    except Exception as exc:  # an architecture transformers cannot build here; the workers will say more
        logger.warning(
            "l2t: could not build %s on the meta device to check the proxy set (%s)", files.path, exc
        )
        return
    try:
        proxy_regex(
            model,
            modules=penalty.modules,
            proxy=penalty.proxy,
            random_fraction=penalty.random_fraction,
            seed=penalty.seed,
        )
    except ValueError as exc:
        random = penalty.proxy == "random_layers" and not penalty.modules
        raise L2TConfigError(f"{'l2t.penalty.proxy' if random else 'l2t.penalty.modules'}: {exc}") from None
    if on_megatron(config):
        # The Megatron backend maps P's Hugging Face names onto Megatron's linears, the last layer's only.
        from l2t_verl.penalty import decoder_layer_indices
        from l2t_verl.penalty.megatron_layout import megatron_proxy_names

        gated = any(".mlp.gate_proj." in name for name, _ in model.named_parameters())
        try:
            megatron_proxy_names(len(decoder_layer_indices(model)), gated=gated, modules=penalty.modules)
        except ValueError as exc:
            raise L2TConfigError(f"l2t.penalty.modules: {exc}") from None


def force_suffix_tokens(force_suffix: str, tokenizer: Any | None) -> int:
    """The force suffix's length in tokens; without a tokenizer, one per UTF-8 byte, a bound that
    byte-level BPE and byte-fallback vocabularies never exceed."""
    if tokenizer is not None:
        return len(tokenizer.encode(force_suffix, add_special_tokens=False))
    return len(force_suffix.encode("utf-8"))


def set_probe_headroom(config: DictConfig, l2t, files: ModelFiles | None = None) -> None:
    """``actor_rollout_ref.rollout.max_model_len``: room above prompt + response for the J_r probes.

    A probe is prompt + reasoning prefix + force suffix + answer, so it can outgrow the generation
    budget by the suffix and the answer. The server clamps a generation to what is left of
    ``max_model_len``, which would cut the sampling estimator's forced answers short silently.
    """
    from l2t_verl.settings import L2TConfigError

    if not l2t.progress_active:
        return
    rollout = config.actor_rollout_ref.rollout
    generation = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    sampling = l2t.progress.estimator == "sampling"
    need = 0
    if sampling:
        tokenizer = (files or ModelFiles(config)).tokenizer("count the l2t.progress.force_suffix tokens")
        suffix = force_suffix_tokens(l2t.progress.force_suffix, tokenizer)
        need = suffix + int(l2t.progress.max_answer_tokens)
    if rollout.get("max_model_len") is None:
        with open_dict(config):
            rollout.max_model_len = generation + max(
                PROBE_HEADROOM_TOKENS, need + PROBE_HEADROOM_MARGIN_TOKENS
            )
        return
    room = int(rollout.max_model_len) - generation
    if sampling and room < need:
        raise L2TConfigError(
            f"actor_rollout_ref.rollout.max_model_len={rollout.max_model_len} leaves {room} tokens above "
            f"data.max_prompt_length + data.max_response_length for a sampling probe, which needs {need} "
            f"(force suffix {suffix} + l2t.progress.max_answer_tokens {l2t.progress.max_answer_tokens}); "
            f"set it to at least {generation + need}, or leave it unset"
        )


# Set in the launching shell, read inside Ray actors. A local cluster started by the driver inherits
# them; the nodes of a running cluster were started elsewhere, so the job's runtime env carries them.
FORWARDED_ENV = ("VERL_FILE_LOGGER_PATH", "VERL_PLATFORM", "TOKENIZERS_PARALLELISM", "L2T_FAULTS")


def join_existing_cluster(config: DictConfig) -> None:
    """Joining a running Ray cluster (``ray_kwargs.ray_init.address`` or ``RAY_ADDRESS``): its nodes
    declare the CPUs and devices, and Ray refuses a driver that declares them again, so the resources a
    preset sets for a local cluster (``preset=cpu``: num_cpus, num_gpus) are dropped; and the
    environment the actors read (:data:`FORWARDED_ENV`, e.g. where the file logger writes the metrics)
    goes into the job's runtime env, since the nodes' processes did not start from this shell."""
    ray_init = config.get("ray_kwargs", {}).get("ray_init", {})
    address = ray_init.get("address") or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return
    with open_dict(config):
        for key in ("num_cpus", "num_gpus", "resources"):
            if key in config.ray_kwargs.ray_init:
                del config.ray_kwargs.ray_init[key]
        forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        if forwarded:
            runtime_env = config.ray_kwargs.ray_init.get("runtime_env") or {}
            env_vars = {**forwarded, **(runtime_env.get("env_vars") or {})}
            config.ray_kwargs.ray_init.runtime_env = {**runtime_env, "env_vars": env_vars}


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
    join_existing_cluster(config)
    l2t = L2TConfig.from_config(config)
    model_files = ModelFiles(config)
    check_method_combination(config, l2t)
    check_penalty_engine(config, l2t)
    check_length_penalty(config)  # the length-penalty baseline's settings, when algo=length_penalty
    rollout = config.actor_rollout_ref.rollout
    if float(rollout.get("temperature", 1.0)) <= 0:
        # verl's actor divides the logits by the rollout temperature: 0 gives inf log-probs and
        # gradient norms of ~1e8 instead of an error. Greedy evaluation is val_kwargs.do_sample=false.
        raise L2TConfigError(
            f"actor_rollout_ref.rollout.temperature must be > 0 for training; got {rollout.temperature}"
        )
    check_proxy_target(config, l2t, model_files)
    set_probe_headroom(config, l2t, model_files)
    if l2t.progress_active and l2t.progress.estimator == "likelihood":
        check_probe_target(config, l2t, model_files)
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
