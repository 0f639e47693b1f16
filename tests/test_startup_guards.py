"""Start-up guards of ``l2t_verl.main.prepare_config`` for settings the penalty or the probes cannot run
under: each must stop the run with one line naming the key, before Ray starts, instead of failing inside
a worker minutes later."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2t_verl.settings import L2TConfig, L2TConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "l2t_verl" / "config")
MAX_PROMPT, MAX_RESPONSE = 96, 96


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """The offline tokenizer and a random (not warm-started) tiny Qwen2, plus a few arithmetic rows:
    everything the start-up checks read, in a few seconds."""
    from l2t_verl.arith_task import make_problems, write_dataset
    from l2t_verl.assets import build_model, build_tokenizer, tokenizer_corpus

    root = tmp_path_factory.mktemp("startup_assets")
    tokenizer = build_tokenizer(tokenizer_corpus(0))
    build_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_dataset(make_problems(4, 0), root / "train.parquet")
    return root


def compose_config(assets: Path, *overrides: str, model: Path | None = None):
    from hydra import compose, initialize_config_dir

    data = assets / "train.parquet"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(
            "l2t_trainer",
            overrides=[
                "preset=cpu",
                "task=arith",
                "algo=l2t",
                f"actor_rollout_ref.model.path={model or assets / 'model'}",
                f"data.train_files={data}",
                f"data.val_files={data}",
                "data.train_batch_size=4",
                f"data.max_prompt_length={MAX_PROMPT}",
                f"data.max_response_length={MAX_RESPONSE}",
                "actor_rollout_ref.rollout.n=4",
                "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
                *overrides,
            ],
        )


def refusal(config) -> str:
    from l2t_verl.main import prepare_config

    with pytest.raises(L2TConfigError) as err:
        prepare_config(config)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_default_l2t_config_passes_and_leaves_the_probes_their_headroom(assets):
    from l2t_verl.main import PROBE_HEADROOM_TOKENS, prepare_config

    config = prepare_config(compose_config(assets))
    assert config.actor_rollout_ref.rollout.max_model_len == MAX_PROMPT + MAX_RESPONSE + PROBE_HEADROOM_TOKENS
    # The ablations' proxy sets and penalty methods pass too.
    prepare_config(compose_config(assets, "l2t.penalty.proxy=random_layers"))
    prepare_config(compose_config(assets, "l2t.penalty.method=reverse"))
    prepare_config(compose_config(assets, r"l2t.penalty.modules='layers\.0\.mlp\.'"))


@pytest.mark.parametrize(
    "key",
    [
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
        "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
        "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
        "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size",
    ],
)
def test_sequence_parallel_is_refused_with_the_penalty(assets, key):
    assert refusal(compose_config(assets, f"{key}=2")).startswith(
        f"{key}=2 is not supported with the L2T penalty"
    )


@pytest.mark.parametrize(
    "key", ["actor_rollout_ref.model.use_liger", "actor_rollout_ref.model.use_fused_kernels"]
)
def test_fused_kernels_are_refused_with_the_penalty(assets, key):
    assert refusal(compose_config(assets, f"{key}=true")).startswith(f"{key}=true is not supported")


@pytest.mark.parametrize(
    "overrides",
    [
        ["l2t.penalty.enable=false"],
        ["l2t.beta=0"],
        ["algo=grpo"],
    ],
)
def test_engine_features_stay_allowed_without_the_penalty(assets, overrides):
    from l2t_verl.main import check_penalty_engine, check_proxy_target

    config = compose_config(
        assets,
        "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
        "actor_rollout_ref.model.use_liger=true",
        "l2t.penalty.modules=nomatch_regex_xyz",
        *overrides,
    )
    l2t = L2TConfig.from_config(config)
    check_penalty_engine(config, l2t)
    check_proxy_target(config, l2t)


# verl's Megatron engine for the actor (and ref) on top of preset=cpu's FSDP2 settings: the guards read
# the strategy and the megatron keys only, and refuse before anything would need megatron-core.
MEGATRON = (
    "model_engine=megatron",
    "actor_rollout_ref.actor.strategy=megatron",
    "actor_rollout_ref.ref.strategy=megatron",
)


@pytest.mark.parametrize(
    "override, start",
    [
        (
            "l2t.penalty.proxy=random_layers",
            "l2t.penalty.proxy=random_layers is not supported on the Megatron engine",
        ),
        ("l2t.penalty.method=forward_ad", "l2t.penalty.method=forward_ad is not supported on the Megatron"),
        (
            "actor_rollout_ref.actor.megatron.context_parallel_size=2",
            "actor_rollout_ref.actor.megatron.context_parallel_size=2 is not supported with the L2T penalty",
        ),
        (
            "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=2 is not supported with "
            "the L2T penalty",
        ),
        ("actor_rollout_ref.model.use_fused_kernels=true", "actor_rollout_ref.model.use_fused_kernels=true"),
    ],
)
def test_what_the_megatron_penalty_cannot_run_is_refused(assets, override, start):
    assert refusal(compose_config(assets, *MEGATRON, override)).startswith(start)


def test_the_megatron_penalty_passes_the_guards_and_the_fsdp_ones_do_not_misfire(assets):
    """TP, PP, SP, one virtual stage, method=auto|reverse pass; the FSDP engines' Ulysses and Liger keys
    are not Megatron's, and the proxy set is checked on the Hugging Face names as on FSDP."""
    from l2t_verl.main import check_penalty_engine, check_proxy_target, on_megatron

    for overrides in (
        [],
        [
            "l2t.penalty.method=reverse",
            "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=1",
        ],
        [
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
            "actor_rollout_ref.actor.megatron.sequence_parallel=true",
            "++actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
            "++actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size=2",
            "actor_rollout_ref.model.use_liger=true",
        ],
    ):
        config = compose_config(assets, *MEGATRON, *overrides)
        l2t = L2TConfig.from_config(config)
        assert on_megatron(config) and l2t.penalty_active
        check_penalty_engine(config, l2t)
        check_proxy_target(config, l2t)
    config = compose_config(assets, *MEGATRON, "l2t.penalty.modules=nomatch_regex_xyz")
    with pytest.raises(L2TConfigError, match=r"^l2t\.penalty\.modules: proxy regex 'nomatch_regex_xyz'"):
        check_proxy_target(config, L2TConfig.from_config(config))


def test_a_megatron_proxy_outside_the_last_layer_is_refused(assets):
    """The tiny model has 2 layers: layer 0's MLP is a valid FSDP proxy (forward_ad), not a Megatron one."""
    from l2t_verl.main import check_proxy_target

    regex = r"layers\.0\.mlp\."
    fsdp = compose_config(assets, f"l2t.penalty.modules='{regex}'")
    check_proxy_target(fsdp, L2TConfig.from_config(fsdp))
    config = compose_config(assets, *MEGATRON, f"l2t.penalty.modules='{regex}'")
    with pytest.raises(L2TConfigError, match=r"^l2t\.penalty\.modules: .*last decoder layer"):
        check_proxy_target(config, L2TConfig.from_config(config))


@pytest.mark.parametrize("overrides", [["l2t.penalty.enable=false"], ["algo=grpo"]])
def test_megatron_features_stay_allowed_without_the_penalty(assets, overrides):
    from l2t_verl.main import check_penalty_engine

    config = compose_config(
        assets,
        *MEGATRON,
        "l2t.penalty.proxy=random_layers",
        "l2t.penalty.method=forward_ad",
        "actor_rollout_ref.actor.megatron.context_parallel_size=2",
        "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size=2",
        *overrides,
    )
    check_penalty_engine(config, L2TConfig.from_config(config))


def test_sampling_probes_get_room_for_the_force_suffix_and_the_answer(assets):
    from transformers import AutoTokenizer

    from l2t_verl.main import PROBE_HEADROOM_TOKENS, force_suffix_tokens, prepare_config

    config = prepare_config(
        compose_config(assets, "l2t.progress.estimator=sampling", "l2t.progress.max_answer_tokens=512")
    )
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    suffix = force_suffix_tokens(L2TConfig.from_config(config).progress.force_suffix, tokenizer)
    room = config.actor_rollout_ref.rollout.max_model_len - MAX_PROMPT - MAX_RESPONSE
    assert room >= suffix + 512 > PROBE_HEADROOM_TOKENS
    # Without a tokenizer the count is a bound: one token per UTF-8 byte.
    for text in ("\n</think>\nThe answer is \\boxed{", "Zürich 中文 🙂 ```python\n"):
        assert force_suffix_tokens(text, None) >= force_suffix_tokens(text, tokenizer)


def test_sampling_probes_refuse_an_explicit_max_model_len_that_would_clamp_them(assets):
    from l2t_verl.main import prepare_config

    sampling = ("l2t.progress.estimator=sampling", "l2t.progress.max_answer_tokens=64")
    tight = f"actor_rollout_ref.rollout.max_model_len={MAX_PROMPT + MAX_RESPONSE + 32}"
    message = refusal(compose_config(assets, *sampling, tight))
    assert message.startswith(f"actor_rollout_ref.rollout.max_model_len={MAX_PROMPT + MAX_RESPONSE + 32} ")
    assert "l2t.progress.max_answer_tokens 64" in message
    # Enough room passes, and the likelihood estimator is not held to the sampling budget.
    roomy = f"actor_rollout_ref.rollout.max_model_len={MAX_PROMPT + MAX_RESPONSE + 256}"
    prepare_config(compose_config(assets, *sampling, roomy))
    prepare_config(compose_config(assets, tight))


def test_a_proxy_regex_matching_no_weight_is_refused(assets):
    message = refusal(compose_config(assets, "l2t.penalty.modules=nomatch_regex_xyz"))
    assert message.startswith("l2t.penalty.modules: proxy regex 'nomatch_regex_xyz' matches no 2-D weight")


def test_a_model_without_decoder_layers_names_the_proxy_setting(assets, tmp_path):
    """GPT-2 names its blocks ``transformer.h.<i>``: neither the default proxy (the last decoder layer's
    MLP) nor random layers can find a layer, and the message names the setting that picked them."""
    from transformers import GPT2Config

    from l2t_verl.main import check_proxy_target

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    for override, key in (
        ("l2t.penalty.proxy=lowrank_svd", "l2t.penalty.modules"),
        ("l2t.penalty.proxy=random_layers", "l2t.penalty.proxy"),
    ):
        config = compose_config(assets, override, model=tmp_path / "gpt2")
        with pytest.raises(L2TConfigError, match=rf"^{key}: no decoder layers found"):
            check_proxy_target(config, L2TConfig.from_config(config))
    config = compose_config(assets, r"l2t.penalty.modules='\.h\.1\.mlp\.c_fc\.'", model=tmp_path / "gpt2")
    check_proxy_target(config, L2TConfig.from_config(config))


def test_reverse_method_with_random_layers_is_refused(assets):
    message = refusal(compose_config(assets, "l2t.penalty.method=reverse", "l2t.penalty.proxy=random_layers"))
    assert message.startswith("l2t.penalty.method=reverse cannot run with l2t.penalty.proxy=random_layers")


def test_a_model_that_cannot_be_loaded_here_is_skipped_with_a_warning(assets, tmp_path, caplog):
    from l2t_verl.main import ModelFiles, check_proxy_target

    # A local path that is not there yet: loads fail fast, without a hub round trip.
    config = compose_config(assets, "l2t.penalty.modules=nomatch_regex_xyz", model=tmp_path / "later")
    files = ModelFiles(config)
    with caplog.at_level(logging.WARNING, logger="l2t_verl"):
        check_proxy_target(config, L2TConfig.from_config(config), files)
        assert files.tokenizer("count") is None  # a non-local path is tried once, then skipped
    assert "could not load the config" in caplog.text and "proxy set" in caplog.text
    assert "could not be reached; not done: count" in caplog.text


@pytest.mark.slow
def test_main_stops_on_a_bad_proxy_regex_at_once_with_one_line(assets, tmp_path):
    """What a user running ``python -m l2t_verl.main`` sees: the bad regex used to surface only at the
    first penalty call, 86 s in, inside a Ray worker's traceback."""
    data = assets / "train.parquet"
    command = [
        sys.executable,
        "-m",
        "l2t_verl.main",
        "preset=cpu",
        "task=arith",
        "algo=l2t",
        f"actor_rollout_ref.model.path={assets / 'model'}",
        f"data.train_files={data}",
        f"data.val_files={data}",
        "l2t.penalty.modules=nomatch_regex_xyz",
    ]
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "l2t-verl: configuration error: l2t.penalty.modules: proxy regex 'nomatch_regex_xyz' matches no 2-D "
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "ray" not in proc.stdout.lower()  # Ray was never started
    # Python, torch and verl imports are most of it (about 8 s on two busy cores).
    assert elapsed < 60, elapsed


def test_joining_a_running_cluster_drops_the_local_resources_and_forwards_the_env(assets, monkeypatch):
    from l2t_verl.main import join_existing_cluster

    local = compose_config(assets)
    join_existing_cluster(local)  # no address: a local cluster keeps the preset's resources
    assert local.ray_kwargs.ray_init.num_gpus == 1 and local.ray_kwargs.ray_init.num_cpus == 32

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "/shared/run/metrics.jsonl")
    joined = compose_config(assets)
    join_existing_cluster(joined)
    ray_init = joined.ray_kwargs.ray_init
    assert "num_gpus" not in ray_init and "num_cpus" not in ray_init
    assert ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH == "/shared/run/metrics.jsonl"
