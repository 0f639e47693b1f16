"""The paper recipes: every setting x variant resolves, with DRY_RUN=1, to the config the paper describes.

A setting is l2t_verl/config/recipe/SETTING.yaml, a variant an algo (l2t, grpo, length_penalty, mrt) or
an L2T ablation switch; `bash recipes/run.sh SETTING VARIANT` launches one, and the historical paths
recipes/SETTING/run_VARIANT.sh are one-line wrappers of it. Each dry run is a subprocess with DATA_DIR
pointing nowhere (the dry run needs neither data nor model), and the YAML it prints is checked: the
paper's hyperparameters, the algorithm the variant names, the setting's model, data, rollout and cluster
shape. The resolved configs also pass the start-up checks the real run does first (verl's
validate_config, the l2t and length_penalty settings).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # a Hydra dry run (a Python start-up) per setting and variant

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RUN = RECIPES / "run.sh"
CONFIG = ROOT / "l2t_verl" / "config"
MODEL = "/nonexistent/model"
DATA = "/nonexistent/data"

# setting -> what its runs must resolve to
SETTING = {
    "deepscaler_1.5b": dict(
        model="agentica-org/DeepScaleR-1.5B-Preview",
        train="aime_1989_2023/train",
        nnodes=1,
        epochs=10,
        rollout_tp=1,
        budget=40960,
    ),
    "r1_distill_1.5b": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        train="numina/train",
        nnodes=1,
        epochs=2,
        rollout_tp=1,
        budget=40960,
    ),
    # one prompt + response per GPU pass: a 7B model's logits are ~12 GB per 20k tokens
    "r1_distill_7b": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        train="numina/train",
        nnodes=2,
        epochs=2,
        rollout_tp=2,
        budget=20480,
    ),
    # HumanEval's 164 problems cannot fill the paper's batch of 256 (documented in the recipe).
    "qwen2_7b_code": dict(
        model="Qwen/Qwen2-7B-Instruct",
        train="humaneval/test",
        val="humaneval/test",
        nnodes=1,
        epochs=10,
        rollout_tp=2,
        budget=20480,
        batch=32,
        mini_batch=8,
        code=True,
    ),
}
VARIANTS = [
    "l2t",
    "grpo",
    "length_penalty",
    "mrt",
    "ablation_no_progress",
    "ablation_no_penalty",
    "ablation_random_layers",
    "ablation_sampling",
]
# On code, L2T already uses the sampling estimator, and MRT-style is then the no-penalty ablation: these
# two runs repeat others there (run.sh still resolves them) and have no run script.
NOT_ON_CODE = {"ablation_sampling", "ablation_no_penalty"}
RUNS = [
    (setting, variant)
    for setting, spec in SETTING.items()
    for variant in VARIANTS
    if not (spec.get("code") and variant in NOT_ON_CODE)
]
WRAPPERS = sorted(RECIPES.glob("*/run_*.sh"))
# The 7B settings' L2T on verl's Megatron engine (penalty on): run.sh with STRATEGY=megatron, TP 2 x PP 2.
MEGATRON_WRAPPERS = [script for script in WRAPPERS if script.stem.endswith("_megatron")]
MEGATRON_SETTINGS = {"r1_distill_7b", "qwen2_7b_code"}


def run_id(run: tuple[str, str]) -> str:
    return "/".join(run)


def launcher_text() -> str:
    return RUN.read_text()


def env_keys() -> list[tuple[str, str]]:
    """recipes/run.sh's table of environment variable -> Hydra key."""
    table = re.search(r"^ENV_KEYS=\((.*?)^\)", launcher_text(), re.M | re.S)
    assert table, "no ENV_KEYS table in recipes/run.sh"
    return re.findall(r"^\s+([A-Z][A-Z0-9_]*)=([a-z0-9_.]+)$", table[1], re.M)


def recipe_variables() -> set[str]:
    """Every variable the recipe scripts read from the environment."""
    read = {
        name
        for path in [*RECIPES.rglob("*.sh"), *RECIPES.rglob("*.sbatch")]
        for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", path.read_text())
    }
    return read | {var for var, _ in env_keys()}


RECIPE_VARIABLES = recipe_variables()


def clean_environ() -> dict[str, str]:
    """The test's environment, without anything from a developer's shell that a recipe would read."""
    return {k: v for k, v in os.environ.items() if k not in RECIPE_VARIABLES}


def dry_run(*args: str, script: Path = RUN, **env: str) -> subprocess.CompletedProcess:
    full_env = {**clean_environ(), "DRY_RUN": "1", "DATA_DIR": DATA, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120
    )


def resolved(*args: str, script: Path = RUN, **env: str) -> dict:
    proc = dry_run(*args, script=script, **env)
    assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    return yaml.safe_load(proc.stdout)


def select(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.fixture(scope="module")
def configs() -> dict[tuple[str, str], dict]:
    """The dry-run config of every setting x variant, two at a time (a Python start-up + a Hydra compose)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(RUNS, pool.map(lambda run: resolved(*run), RUNS), strict=True))


# --------------------------------------------------------------------------------- settings and variants


def test_settings_and_variants_are_the_config_groups():
    assert sorted(p.stem for p in (CONFIG / "recipe").glob("*.yaml")) == sorted(SETTING)
    algos = [p.stem for p in (CONFIG / "algo").glob("*.yaml")]
    ablations = [f"ablation_{p.stem}" for p in (CONFIG / "ablation").glob("*.yaml")]
    assert sorted(algos + ablations) == sorted(VARIANTS)


def flat_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_each_setting_is_one_file_with_the_same_keys():
    """A setting reads whole in its file: the same keys in every one (code adds its J_r probe), and no
    defaults but the engine's keys (recipe_engine/, shared: the FSDP2 or Megatron names of bf16 + cosine)."""
    keys = {}
    for setting in SETTING:
        recipe = yaml.safe_load((CONFIG / "recipe" / f"{setting}.yaml").read_text())
        assert recipe.pop("defaults") == [{"override /recipe_engine": "${model_engine}"}, "_self_"], setting
        keys[setting] = flat_keys(recipe)
    code_only = keys["qwen2_7b_code"] - keys["r1_distill_1.5b"]
    assert code_only == {
        f"l2t.progress.{k}" for k in ("estimator", "force_suffix", "max_answer_tokens", "timeout_s")
    }
    for setting in SETTING:
        assert keys[setting] - code_only == keys["r1_distill_1.5b"], setting


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_dry_run_has_the_papers_hyperparameters(configs, run):
    setting, variant = run
    c, spec = configs[run], SETTING[setting]
    actor = c["actor_rollout_ref"]["actor"]
    rollout = c["actor_rollout_ref"]["rollout"]
    optim = actor["optim"]
    assert optim["lr"] == pytest.approx(1e-6)
    assert optim["weight_decay"] == pytest.approx(0.01)
    assert optim["lr_scheduler_type"] == "cosine"
    assert optim["lr_warmup_steps_ratio"] == pytest.approx(0.1)
    assert c["data"]["train_batch_size"] == spec.get("batch", 256)
    assert actor["ppo_mini_batch_size"] == spec.get("mini_batch", 64)
    assert c["data"]["max_prompt_length"] == 4096
    assert c["data"]["max_response_length"] == 16384
    assert rollout["prompt_length"] == 4096 and rollout["response_length"] == 16384
    assert actor["ppo_max_token_len_per_gpu"] == rollout["log_prob_max_token_len_per_gpu"] == spec["budget"]
    assert actor["use_dynamic_bsz"] and rollout["log_prob_use_dynamic_bsz"]
    assert rollout["dtype"] == "bfloat16" and actor["fsdp_config"]["dtype"] == "bfloat16"
    assert rollout["gpu_memory_utilization"] == pytest.approx(0.8)
    assert rollout["n"] == 8 and rollout["tensor_model_parallel_size"] == spec["rollout_tp"]
    assert actor["strategy"] == "fsdp2" and c["actor_rollout_ref"]["ref"]["strategy"] == "fsdp2"
    assert c["model_engine"] == "dp"
    assert rollout["name"] == "vllm"
    assert not actor["use_kl_loss"] and actor["entropy_coeff"] == 0
    assert c["l2t"]["alpha"] == pytest.approx(0.8) and c["l2t"]["beta"] == pytest.approx(0.6)
    assert c["l2t"]["penalty"]["damping"] == pytest.approx(1e-5)
    trainer = c["trainer"]
    assert trainer["nnodes"] == spec["nnodes"] and trainer["n_gpus_per_node"] == 8
    assert trainer["total_epochs"] == spec["epochs"]
    assert c["actor_rollout_ref"]["model"]["path"] == spec["model"]
    # scripts/data/prepare.py NAME --output DIR writes DIR/train.parquet (training sets) or DIR/test.parquet
    assert c["data"]["train_files"] == f"{DATA}/{spec['train']}.parquet"
    assert c["data"]["val_files"] == f"{DATA}/{spec.get('val', 'aime24/test')}.parquet"
    assert trainer["project_name"] == f"l2t_{setting}"
    assert trainer["experiment_name"] == variant
    assert trainer["default_local_dir"] == str(ROOT / "outputs" / f"l2t_{setting}" / variant / "checkpoints")


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_dry_run_is_the_algorithm_the_variant_names(configs, run):
    setting, variant = run
    c, code = configs[run], SETTING[setting].get("code", False)
    adv = c["algorithm"]["adv_estimator"]
    manager = c["reward"]["reward_manager"]["name"]
    agent = c["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"]
    l2t = c["l2t"]
    if variant == "grpo":
        assert (adv, manager, agent, l2t["enable"]) == ("grpo", "naive", "single_turn_agent", False)
        return
    if variant == "length_penalty":
        assert (adv, manager, agent, l2t["enable"]) == ("grpo", "length_penalty", "single_turn_agent", False)
        assert c["length_penalty"] == {"coef": 0.2, "max_length": None, "correct_only": True}
        return
    assert (adv, manager, agent, c["trainer"]["v1"]["trainer_mode"]) == ("l2t", "l2t", "l2t", "l2t")
    assert l2t["enable"]
    # docs/method.md §6: each run flips exactly its own switch(es) from the L2T defaults of its setting
    expected = {
        "progress": True,
        "penalty": True,
        "proxy": "lowrank_svd",
        "estimator": "sampling" if code else "likelihood",
    }
    expected.update(
        {
            "l2t": {},
            "mrt": {"estimator": "sampling", "penalty": False},
            "ablation_no_progress": {"progress": False},
            "ablation_no_penalty": {"penalty": False},
            "ablation_random_layers": {"proxy": "random_layers"},
            "ablation_sampling": {"estimator": "sampling"},
        }[variant]
    )
    got = {
        "progress": l2t["progress"]["enable"],
        "penalty": l2t["penalty"]["enable"],
        "proxy": l2t["penalty"]["proxy"],
        "estimator": l2t["progress"]["estimator"],
    }
    assert got == expected
    if code:
        # the forced answer opens a Python block that the code verifier can run
        assert l2t["progress"]["force_suffix"].endswith("```python\n")
        assert l2t["progress"]["max_answer_tokens"] >= 256 and l2t["progress"]["timeout_s"] >= 300


def test_dry_runs_pass_the_start_up_checks_of_a_real_run(configs):
    """What l2t_verl.main.prepare_config checks before any worker (dataset files aside: none here)."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from l2t_verl.length_penalty import check_length_penalty
    from l2t_verl.settings import L2TConfig

    for (setting, variant), values in configs.items():
        config = OmegaConf.create(values)
        l2t = L2TConfig.from_config(config)
        assert l2t.enable == (variant not in {"grpo", "length_penalty"}), (setting, variant)
        assert (check_length_penalty(config) is not None) == (variant == "length_penalty"), (setting, variant)
        assert not need_critic(config) and not need_reference_policy(config), (setting, variant)
        validate_config(config=config, use_reference_policy=False, use_critic=False)


# ------------------------------------------------------------------------------------- the old paths


def test_every_setting_keeps_its_run_scripts():
    assert {p.name for p in RECIPES.iterdir() if p.is_dir() and p.name != "cluster"} == set(SETTING)
    for setting in SETTING:
        expected = {variant for s, variant in RUNS if s == setting}
        plain = [s for s in WRAPPERS if s.parent.name == setting and s not in MEGATRON_WRAPPERS]
        assert {s.stem.removeprefix("run_") for s in plain} == expected
    assert {s.parent.name for s in MEGATRON_WRAPPERS} == MEGATRON_SETTINGS
    assert {s.name for s in MEGATRON_WRAPPERS} == {"run_l2t_megatron.sh"}


@pytest.mark.parametrize(
    "script", [s for s in WRAPPERS if s not in MEGATRON_WRAPPERS], ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_run_scripts_are_one_line_wrappers_of_the_launcher(script):
    setting, variant = script.parent.name, script.stem.removeprefix("run_")
    assert script.read_text() == (
        f'#!/usr/bin/env bash\nexec bash "$(dirname "$0")/../run.sh" {setting} {variant} "$@"\n'
    )
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", MEGATRON_WRAPPERS, ids=lambda p: p.parent.name)
def test_megatron_run_scripts_wrap_the_launcher_with_tp2_pp2(script):
    """The same one command, with STRATEGY=megatron and the sizes as overridable defaults."""
    lines = [line for line in script.read_text().splitlines() if not line.startswith("#")]
    assert lines == [
        "STRATEGY=megatron TRAIN_TP=${TRAIN_TP:-2} TRAIN_PP=${TRAIN_PP:-2} \\",
        f'  exec bash "$(dirname "$0")/../run.sh" {script.parent.name} l2t "$@"',
    ]
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize(
    "setting, env, tp",
    [("r1_distill_7b", {}, 2), ("qwen2_7b_code", {"TRAIN_TP": "4", "STRATEGY": "fsdp"}, 4)],
)
def test_megatron_l2t_resolves_with_the_penalty_on_megatron(setting, env, tp):
    """DRY_RUN=1 of <setting>/run_l2t_megatron.sh: L2T with its penalty, on model_engine=megatron, TP x PP
    for the actor and (verl's interpolation) the reference model; TRAIN_TP overrides, STRATEGY cannot."""
    from omegaconf import OmegaConf

    from l2t_verl.main import check_penalty_engine, on_megatron
    from l2t_verl.settings import L2TConfig

    c = resolved(script=RECIPES / setting / "run_l2t_megatron.sh", **env)
    arf = c["actor_rollout_ref"]
    assert c["model_engine"] == "megatron"
    assert arf["actor"]["strategy"] == arf["ref"]["strategy"] == "megatron"
    for side in ("actor", "ref"):
        megatron = arf[side]["megatron"]
        assert megatron["tensor_model_parallel_size"] == tp, side
        assert megatron["pipeline_model_parallel_size"] == 2, side
        assert megatron["sequence_parallel"] is True, side
        assert megatron["context_parallel_size"] == 1, side
        assert megatron["virtual_pipeline_model_parallel_size"] is None, side
        assert megatron["dtype"] == "bfloat16", side
    assert arf["actor"]["optim"]["lr_decay_style"] == "cosine"
    assert c["algorithm"]["adv_estimator"] == "l2t" and c["trainer"]["experiment_name"] == "l2t"
    assert c["l2t"]["enable"] and c["l2t"]["penalty"]["enable"]
    assert c["l2t"]["penalty"]["proxy"] == "lowrank_svd" and c["l2t"]["penalty"]["method"] == "auto"
    config = OmegaConf.create(c)
    l2t = L2TConfig.from_config(config)
    assert l2t.penalty_active and on_megatron(config)
    check_penalty_engine(config, l2t)  # the start-up refusals let it through


def test_a_run_script_resolves_what_the_launcher_does(configs):
    script = RECIPES / "qwen2_7b_code" / "run_mrt.sh"
    assert resolved("trainer.save_freq=3", script=script) == {
        **configs["qwen2_7b_code", "mrt"],
        "trainer": {**configs["qwen2_7b_code", "mrt"]["trainer"], "save_freq": 3},
    }


# ------------------------------------------------------------------------ environment and CLI overrides

ENV_VALUES = {
    "MODEL_PATH": ("/models/x", "/models/x"),
    "NNODES": ("3", 3),
    "GPUS_PER_NODE": ("4", 4),
    "ROLLOUT": ("sglang", "sglang"),
    "ROLLOUT_TP": ("4", 4),
    "TOTAL_EPOCHS": ("7", 7),
    "PROJECT_NAME": ("proj", "proj"),
    "LR": ("2e-6", 2e-6),
    "WEIGHT_DECAY": ("0.02", 0.02),
    "WARMUP_RATIO": ("0.05", 0.05),
    "TRAIN_BATCH": ("128", 128),
    "PPO_MINI_BATCH": ("32", 32),
    "ROLLOUT_N": ("4", 4),
    "MAX_PROMPT_LENGTH": ("2048", 2048),
    "MAX_RESPONSE_LENGTH": ("8192", 8192),
    "MAX_TOKEN_LEN_PER_GPU": ("30000", 30000),
    "LOG_PROB_MICRO_BSZ": ("2", 2),
    "GPU_MEMORY_UTILIZATION": ("0.7", 0.7),
    "ALPHA": ("0.5", 0.5),
    "BETA": ("0.3", 0.3),
    "DAMPING": ("1e-4", 1e-4),
    "SAVE_FREQ": ("3", 3),
    "TEST_FREQ": ("2", 2),
    "LOGGER": ("[console]", ["console"]),
    "SEED": ("7", 7),
}


def test_every_environment_variable_reaches_its_key():
    keys = env_keys()
    assert {var for var, _ in keys} == set(ENV_VALUES)
    c = resolved(
        "r1_distill_1.5b",
        "ablation_random_layers",
        "trainer.save_freq=9",
        **{var: value for var, (value, _) in ENV_VALUES.items()},
        DATA_DIR="rel/data",
        EXPERIMENT_NAME="exp",
        OUTPUT_DIR="rel/out",
        CODE_FORCE_SUFFIX="\n```python\n",
    )
    for var, key in keys:
        expected = ENV_VALUES[var][1]
        if key == "trainer.save_freq":
            expected = 9  # Hydra arguments win over the environment
        if isinstance(expected, float):
            expected = pytest.approx(expected)
        assert select(c, key) == expected, (var, key)
    assert c["l2t"]["penalty"]["proxy"] == "random_layers"
    assert c["l2t"]["progress"]["force_suffix"] == "\n```python\n"
    # local paths become absolute, against the directory the launcher runs in
    assert c["data"]["train_files"] == str(ROOT / "rel" / "data" / "numina" / "train.parquet")
    assert c["data"]["val_files"] == str(ROOT / "rel" / "data" / "aime24" / "test.parquet")
    assert c["trainer"]["experiment_name"] == "exp"
    assert c["trainer"]["default_local_dir"] == str(ROOT / "rel" / "out" / "checkpoints")


@pytest.mark.parametrize("setting, budget", [("r1_distill_1.5b", 24576), ("r1_distill_7b", 12288)])
def test_shorter_lengths_scale_the_token_budgets(setting, budget):
    """MAX_RESPONSE_LENGTH alone: the budgets keep their ratio to one prompt + response (2x, 1x). And
    the data files and checkpoints one by one."""
    c = resolved(
        setting,
        "grpo",
        MAX_RESPONSE_LENGTH="8192",
        TRAIN_FILE="rel/t.parquet",
        VAL_FILE="hdfs://x/v.parquet",
        CKPT_DIR="/ckpt/here",
    )
    assert c["data"]["max_response_length"] == 8192
    assert c["actor_rollout_ref"]["actor"]["ppo_max_token_len_per_gpu"] == budget
    assert c["actor_rollout_ref"]["rollout"]["log_prob_max_token_len_per_gpu"] == budget
    assert c["data"]["train_files"] == str(ROOT / "rel" / "t.parquet")
    assert c["data"]["val_files"] == "hdfs://x/v.parquet"
    assert c["trainer"]["default_local_dir"] == "/ckpt/here"
    assert c["trainer"]["project_name"] == f"l2t_{setting}" and c["trainer"]["experiment_name"] == "grpo"


def test_megatron_strategy_sets_megatrons_own_keys():
    c = resolved("r1_distill_7b", "grpo", STRATEGY="megatron", TRAIN_TP="2")
    actor = c["actor_rollout_ref"]["actor"]
    assert c["model_engine"] == "megatron" and actor["strategy"] == "megatron"
    assert actor["megatron"]["dtype"] == "bfloat16" and actor["megatron"]["tensor_model_parallel_size"] == 2
    assert actor["optim"]["lr_decay_style"] == "cosine"
    assert actor["optim"]["lr_warmup_steps_ratio"] == pytest.approx(0.1)
    assert actor["optim"]["weight_decay"] == pytest.approx(0.01)
    assert actor["optim"]["lr"] == pytest.approx(1e-6)
    # TRAIN_PP alone; the reference model follows the actor's sizes
    mrt = resolved("r1_distill_7b", "mrt", STRATEGY="megatron", TRAIN_PP="4")
    assert mrt["model_engine"] == "megatron"
    ref = mrt["actor_rollout_ref"]["ref"]["megatron"]
    assert mrt["actor_rollout_ref"]["actor"]["megatron"]["pipeline_model_parallel_size"] == 4
    assert ref["pipeline_model_parallel_size"] == 4 and ref["tensor_model_parallel_size"] == 1


@pytest.mark.parametrize(
    "args, env, key",
    [
        (("r1_distill_1.5b", "l2t"), {"STRATEGY": "deepspeed"}, "STRATEGY"),
        (("r1_distill_7b", "l2t"), {"STRATEGY": "megatron", "TRAIN_PP": "0"}, "TRAIN_PP"),
        (("r1_distill_7b", "l2t"), {"STRATEGY": "megatron", "TRAIN_TP": "2x"}, "TRAIN_TP"),
        (("r1_distill_1.5b", "l2t"), {"ROLLOUT": "hf"}, "ROLLOUT"),
        (("r1_distill_1.5b", "l2t"), {"NNODES": "two"}, "NNODES"),
        (("r1_distill_1.5b", "l2t"), {"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE"),
        (("r1_distill_1.5b", "l2t"), {"MAX_RESPONSE_LENGTH": "8k"}, "MAX_RESPONSE_LENGTH"),
        (("r1_distill_3b", "l2t"), {}, "SETTING"),
        (("r1_distill_1.5b", "ablation_none"), {}, "VARIANT"),
        (("r1_distill_1.5b", "ppo"), {}, "VARIANT"),
    ],
)
def test_bad_variables_are_one_line_errors_naming_them(args, env, key):
    proc = dry_run(*args, **env)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "configuration error" in lines[0]


@pytest.mark.parametrize(
    "args", [("r1_distill_1.5b", "l2t"), ("r1_distill_1.5b", "ablation_no_penalty"), ("qwen2_7b_code", "mrt")]
)
def test_the_launcher_takes_megatron_with_or_without_the_penalty(args):
    """The launcher's own checks (before any Python) pass every variant on Megatron, the penalty's
    included (what the Megatron penalty cannot run under, l2t_verl/main.py refuses at start-up); next it
    asks PYTHON for the recipe: a PYTHON that fails stops it there, without a Hydra compose."""
    proc = dry_run(*args, STRATEGY="megatron", TRAIN_TP="2", TRAIN_PP="2", PYTHON="false")
    assert proc.returncode == 2 and "could not read" in proc.stderr
    assert "STRATEGY" not in proc.stderr


def test_usage():
    proc = dry_run("r1_distill_1.5b")
    assert proc.returncode == 2 and proc.stdout == "" and "usage: bash recipes/run.sh" in proc.stderr
    assert all(name in proc.stderr for name in [*SETTING, *VARIANTS])


def test_unknown_hydra_key_fails_the_dry_run():
    proc = dry_run("r1_distill_1.5b", "l2t", "l2t.penalty.enabel=false")
    assert proc.returncode != 0 and "enabel" in proc.stderr


# ------------------------------------------------------------------------------------ shell and cluster

SHELL_SCRIPTS = sorted([*RECIPES.rglob("*.sh"), *RECIPES.rglob("*.sbatch")])
SBATCH = RECIPES / "cluster" / "slurm_example.sbatch"
RAY_CLUSTER = RECIPES / "cluster" / "ray_cluster.sh"


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ray_cluster_commands():
    env = {**clean_environ(), "DRY_RUN": "1", "NUM_GPUS": "8", "NUM_CPUS": "32"}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(RAY_CLUSTER), *args], capture_output=True, text=True, env={**env, **extra}
        )

    head = run("head").stdout.split()
    assert head[:3] == ["ray", "start", "--head"] and "--num-gpus=8" in head and "--block" not in head
    worker = run("worker", "10.0.0.1", BLOCK="1").stdout.split()
    assert "--address=10.0.0.1:6379" in worker and "--block" in worker and "--num-cpus=32" in worker
    assert run("bogus").returncode != 0 and run("worker").returncode != 0


def test_readme_lists_every_setting_run_and_variable():
    readme = (RECIPES / "README.md").read_text()
    for name in [*SETTING, *VARIANTS]:
        assert f"`{name}`" in readme, name
    for script in WRAPPERS:
        assert f"{script.parent.name}/{script.name}" in readme, script
    documented = RECIPE_VARIABLES - {"VERL_FILE_LOGGER_PATH", "TOKENIZERS_PARALLELISM"}
    cluster_only = {
        name
        for path in [SBATCH, RAY_CLUSTER]
        for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", path.read_text())
    }
    for var in documented - cluster_only:
        assert f"`{var}`" in readme, var
