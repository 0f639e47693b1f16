"""The paper recipes (recipes/): every run script resolves, with DRY_RUN=1, to the config the paper describes.

Each script runs as a subprocess with MODEL_PATH / DATA_DIR pointing nowhere (the dry run needs neither),
and the YAML it prints is checked: the paper's hyperparameters, the algorithm its name promises, the
recipe's model, data, rollout and cluster shape. The resolved configs also pass the start-up checks the
real run does first (verl's validate_config, the l2t and length_penalty settings).
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

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SCRIPTS = sorted(RECIPES.glob("*/run_*.sh"))
MODEL = "/nonexistent/model"
DATA = "/nonexistent/data"

# recipe -> what its scripts must resolve to
RECIPE = {
    "deepscaler_1.5b": dict(
        model="agentica-org/DeepScaleR-1.5B-Preview", train="aime_1989_2023", nnodes=1, batch=256, code=False
    ),
    "r1_distill_1.5b": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", train="numina", nnodes=1, batch=256, code=False
    ),
    "r1_distill_7b": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", train="numina", nnodes=2, batch=256, code=False
    ),
    # HumanEval's 164 problems cannot fill the paper's batch of 256 (documented in the script).
    "qwen2_7b_code": dict(model="Qwen/Qwen2-7B-Instruct", train="humaneval", nnodes=1, batch=32, code=True),
}
RUNS = {
    "l2t",
    "grpo",
    "length_penalty",
    "mrt",
    "ablation_no_progress",
    "ablation_no_penalty",
    "ablation_random_layers",
    "ablation_sampling",
}
# On code, L2T already uses the sampling estimator, and MRT-style is then the no-penalty ablation.
NOT_ON_CODE = {"ablation_sampling", "ablation_no_penalty"}
TOP_VARIABLES = (
    "MODEL_PATH",
    "DATA_DIR",
    "NNODES",
    "GPUS_PER_NODE",
    "ROLLOUT",
    "STRATEGY",
    "OUTPUT_DIR",
    "CKPT_DIR",
    "PROJECT_NAME",
    "EXPERIMENT_NAME",
)


def recipe_of(script: Path) -> str:
    return script.parent.name


def run_of(script: Path) -> str:
    return script.stem.removeprefix("run_")


# Every variable the scripts read from the environment, so that a developer's shell cannot leak into a test.
RECIPE_VARIABLES = {
    name
    for path in [*RECIPES.rglob("*.sh"), *RECIPES.rglob("*.sbatch")]
    for name in re.findall(r"^\s*([A-Z][A-Z0-9_]*)=\$\{\1:-", path.read_text(), re.M)
}


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in RECIPE_VARIABLES and k != "VERL_FILE_LOGGER_PATH"}


def dry_run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {
        **clean_environ(),
        "DRY_RUN": "1",
        "MODEL_PATH": MODEL,
        "DATA_DIR": DATA,
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120
    )


def resolved(script: Path, *args: str, **env: str) -> dict:
    proc = dry_run(script, *args, **env)
    assert proc.returncode == 0, f"{script}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def configs() -> dict[Path, dict]:
    """The dry-run config of every script, two at a time (each is a Python start-up plus a Hydra compose)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(resolved, SCRIPTS), strict=True))


def test_every_recipe_has_every_run():
    assert {p.name for p in RECIPES.iterdir() if p.is_dir() and p.name != "cluster"} == set(RECIPE)
    for recipe, spec in RECIPE.items():
        expected = RUNS - NOT_ON_CODE if spec["code"] else RUNS
        assert {run_of(s) for s in SCRIPTS if recipe_of(s) == recipe} == expected, recipe


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_variables_sit_at_the_top_and_are_overridable(script):
    text = script.read_text()
    head = text.split("source ", 1)[0]
    for var in TOP_VARIABLES:
        assert re.search(rf"^{var}=\$\{{{var}:-[^}}]*\}}", head, re.M), f"{script.name}: {var} not at the top"
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_has_the_papers_hyperparameters(configs, script):
    c = configs[script]
    spec = RECIPE[recipe_of(script)]
    actor = c["actor_rollout_ref"]["actor"]
    rollout = c["actor_rollout_ref"]["rollout"]
    optim = actor["optim"]
    assert optim["lr"] == pytest.approx(1e-6)
    assert optim["weight_decay"] == pytest.approx(0.01)
    assert optim["lr_scheduler_type"] == "cosine"
    assert optim["lr_warmup_steps_ratio"] == pytest.approx(0.1)
    assert c["data"]["train_batch_size"] == spec["batch"]
    assert c["data"]["max_prompt_length"] == 4096
    assert c["data"]["max_response_length"] == 16384
    assert rollout["prompt_length"] == 4096 and rollout["response_length"] == 16384
    assert rollout["dtype"] == "bfloat16" and actor["fsdp_config"]["dtype"] == "bfloat16"
    assert rollout["gpu_memory_utilization"] == pytest.approx(0.8)
    assert actor["strategy"] == "fsdp2" and c["model_engine"] == "dp"
    assert rollout["name"] == "vllm"
    assert c["trainer"]["nnodes"] == spec["nnodes"] and c["trainer"]["n_gpus_per_node"] == 8
    assert c["actor_rollout_ref"]["model"]["path"] == MODEL
    # scripts/data/prepare.py NAME --output DIR writes DIR/train.parquet (training sets) or DIR/test.parquet
    split = "test" if spec["train"] == "humaneval" else "train"
    assert c["data"]["train_files"] == f"{DATA}/{spec['train']}/{split}.parquet"
    val = "humaneval" if spec["code"] else "aime24"
    assert c["data"]["val_files"] == f"{DATA}/{val}/test.parquet"
    assert c["trainer"]["project_name"] == f"l2t_{recipe_of(script)}"
    assert c["trainer"]["experiment_name"] == run_of(script)
    assert c["trainer"]["default_local_dir"] == str(
        ROOT / "outputs" / f"l2t_{recipe_of(script)}" / run_of(script) / "checkpoints"
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_is_the_algorithm_the_script_is_named_after(configs, script):
    c = configs[script]
    run, code = run_of(script), RECIPE[recipe_of(script)]["code"]
    adv = c["algorithm"]["adv_estimator"]
    manager = c["reward"]["reward_manager"]["name"]
    agent = c["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"]
    l2t = c["l2t"]
    if run == "grpo":
        assert (adv, manager, agent, l2t["enable"]) == ("grpo", "naive", "single_turn_agent", False)
        return
    if run == "length_penalty":
        assert (adv, manager, agent, l2t["enable"]) == ("grpo", "length_penalty", "single_turn_agent", False)
        assert c["length_penalty"] == {"coef": 0.2, "max_length": None, "correct_only": True}
        return
    assert (adv, manager, agent, c["trainer"]["v1"]["trainer_mode"]) == ("l2t", "l2t", "l2t", "l2t")
    assert l2t["enable"] and l2t["alpha"] == pytest.approx(0.8) and l2t["beta"] == pytest.approx(0.6)
    assert l2t["penalty"]["damping"] == pytest.approx(1e-5)
    # docs/method.md §6: each run flips exactly its own switch(es) from the L2T defaults of its recipe
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
        }[run]
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

    for script, values in configs.items():
        config = OmegaConf.create(values)
        l2t = L2TConfig.from_config(config)
        assert l2t.enable == (run_of(script) not in {"grpo", "length_penalty"}), script
        assert (check_length_penalty(config) is not None) == (run_of(script) == "length_penalty"), script
        assert not need_critic(config) and not need_reference_policy(config), script
        validate_config(config=config, use_reference_policy=False, use_critic=False)


# ------------------------------------------------------------------------ environment and CLI overrides

L2T_MATH = RECIPES / "r1_distill_1.5b" / "run_l2t.sh"


def test_environment_and_hydra_overrides_reach_the_config():
    c = resolved(
        L2T_MATH,
        "l2t.beta=0.3",
        "trainer.save_freq=7",
        ROLLOUT="sglang",
        NNODES="4",
        GPUS_PER_NODE="4",
        LR="2e-6",
        EXPERIMENT_NAME="beta03",
        CKPT_DIR="/ckpt/here",
    )
    assert c["actor_rollout_ref"]["rollout"]["name"] == "sglang"
    assert (c["trainer"]["nnodes"], c["trainer"]["n_gpus_per_node"]) == (4, 4)
    assert c["actor_rollout_ref"]["actor"]["optim"]["lr"] == pytest.approx(2e-6)
    assert c["l2t"]["beta"] == pytest.approx(0.3) and c["trainer"]["save_freq"] == 7
    assert c["trainer"]["experiment_name"] == "beta03" and c["trainer"]["default_local_dir"] == "/ckpt/here"


def test_megatron_strategy_sets_megatrons_own_keys():
    c = resolved(RECIPES / "r1_distill_7b" / "run_grpo.sh", STRATEGY="megatron", TRAIN_TP="2")
    actor = c["actor_rollout_ref"]["actor"]
    assert c["model_engine"] == "megatron" and actor["strategy"] == "megatron"
    assert actor["megatron"]["dtype"] == "bfloat16" and actor["megatron"]["tensor_model_parallel_size"] == 2
    assert actor["optim"]["lr_decay_style"] == "cosine"
    assert actor["optim"]["lr_warmup_steps_ratio"] == pytest.approx(0.1)
    assert actor["optim"]["weight_decay"] == pytest.approx(0.01)
    assert actor["optim"]["lr"] == pytest.approx(1e-6)
    # MRT has no penalty, so it runs on megatron too
    mrt = resolved(RECIPES / "r1_distill_7b" / "run_mrt.sh", STRATEGY="megatron")
    assert mrt["model_engine"] == "megatron"


@pytest.mark.parametrize(
    "script, env, key",
    [
        # the L2T penalty is computed on the FSDP2 engine only
        (L2T_MATH, {"STRATEGY": "megatron"}, "STRATEGY"),
        (L2T_MATH, {"STRATEGY": "deepspeed"}, "STRATEGY"),
        (L2T_MATH, {"ROLLOUT": "hf"}, "ROLLOUT"),
        (L2T_MATH, {"NNODES": "two"}, "NNODES"),
        (L2T_MATH, {"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE"),
    ],
)
def test_bad_variables_are_one_line_errors_naming_them(script, env, key):
    proc = dry_run(script, **env)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "configuration error" in lines[0]


def test_unknown_hydra_key_fails_the_dry_run():
    proc = dry_run(L2T_MATH, "l2t.penalty.enabel=false")
    assert proc.returncode != 0 and "enabel" in proc.stderr


# ------------------------------------------------------------------------------------ shell and cluster

SHELL_SCRIPTS = sorted([*RECIPES.rglob("*.sh"), *RECIPES.rglob("*.sbatch")])
SBATCH = RECIPES / "cluster" / "slurm_example.sbatch"
RAY_CLUSTER = RECIPES / "cluster" / "ray_cluster.sh"


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_directives_parse():
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!")
    # sbatch reads #SBATCH lines only until the first command
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives and all(lines.index(d) < first_command for d in directives)
    options = {}
    for directive in directives:
        match = re.fullmatch(r"#SBATCH --([a-z][a-z-]*)(?:=(\S+))?", directive)
        assert match, directive
        options[match[1]] = match[2]
    assert {"nodes", "gpus-per-node", "ntasks-per-node", "time"} <= set(options)
    assert int(options["nodes"]) >= 1 and int(options["gpus-per-node"]) >= 1
    assert re.fullmatch(r"\d+:\d\d:\d\d", options["time"])


def test_sbatch_starts_ray_on_every_node_and_launches_the_recipe_with_the_allocation():
    env = {
        **clean_environ(),
        "DRY_RUN": "1",
        "HOSTS": "gpu01 gpu02 gpu03",
        "MODEL_PATH": MODEL,
        "DATA_DIR": DATA,
    }
    env.update(PYTHON=sys.executable, GPUS_PER_NODE="4", RECIPE="recipes/deepscaler_1.5b/run_l2t.sh")
    proc = subprocess.run(
        ["bash", str(SBATCH)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=90
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the steps start in the background, so they may print in any order
    steps = sorted(line for line in proc.stderr.splitlines() if line.startswith("[dry-run] srun"))
    assert len(steps) == 3
    assert "-w gpu01 " in steps[0] and steps[0].endswith("ray_cluster.sh head")
    for host, step in zip(["gpu02", "gpu03"], steps[1:], strict=True):
        assert f"-w {host} " in step and step.endswith("ray_cluster.sh worker gpu01:6379")
    c = yaml.safe_load(proc.stdout)
    assert (c["trainer"]["nnodes"], c["trainer"]["n_gpus_per_node"]) == (3, 4)
    assert c["algorithm"]["adv_estimator"] == "l2t"


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


def test_readme_lists_every_run_script():
    readme = (RECIPES / "README.md").read_text()
    for script in SCRIPTS:
        assert f"{recipe_of(script)}/{script.name}" in readme, script
