"""Spec 8 at start-up: bad settings and bad dataset rows stop the run with one line naming the culprit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from l2t_verl.dataset import DatasetError, validate_dataset
from l2t_verl.settings import L2TConfig, L2TConfigError

BASE = OmegaConf.load(Path(__file__).resolve().parents[1] / "l2t_verl" / "config" / "l2t_trainer.yaml")


def settings(**overrides) -> dict:
    node = OmegaConf.to_container(BASE.l2t, resolve=True)
    for dotted, value in overrides.items():
        *path, last = dotted.split("__")
        target = node
        for key in path:
            target = target[key]
        target[last] = value
    return node


def test_shipped_defaults_are_the_papers():
    cfg = L2TConfig.from_config(BASE)
    assert (cfg.alpha, cfg.beta, cfg.penalty.damping) == (0.8, 0.6, 1e-5)
    assert cfg.episodes.max_episodes == 20 and cfg.progress.estimator == "likelihood"
    assert cfg.penalty.reference == "previous_step" and cfg.penalty.proxy == "lowrank_svd"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"alpha": -0.1}, "l2t.alpha"),
        ({"beta": "high"}, "l2t.beta"),
        ({"penalty__rank": 0}, "l2t.penalty.rank"),
        ({"penalty__damping": 0.0}, "l2t.penalty.damping"),
        ({"penalty__proxy": "all_layers"}, "l2t.penalty.proxy"),
        ({"penalty__reference": "yesterday"}, "l2t.penalty.reference"),
        ({"penalty__modules": "mlp.(("}, "l2t.penalty.modules"),
        ({"progress__estimator": "oracle"}, "l2t.progress.estimator"),
        ({"progress__num_samples": 0}, "l2t.progress.num_samples"),
        ({"episodes__mode": "sentences"}, "l2t.episodes.mode"),
        ({"episodes__max_episodes": 0}, "l2t.episodes.max_episodes"),
        ({"episodes__delimiter": ""}, "l2t.episodes.delimiter"),
        ({"unknown_knob": 1}, "l2t.unknown_knob"),
        ({"penalty__rnak": 4}, "l2t.penalty.rnak"),
    ],
)
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(L2TConfigError) as err:
        L2TConfig.from_config({"l2t": settings(**overrides)})
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def _rows(n: int = 3) -> list[dict]:
    return [
        {
            "data_source": "l2t_arith",
            "prompt": [{"role": "user", "content": f"Start at {i}. Add 1."}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
            "extra_info": {"index": i},
        }
        for i in range(n)
    ]


def _write(tmp_path, rows) -> str:
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_a_good_dataset_passes(tmp_path):
    assert validate_dataset(_write(tmp_path, _rows())) == 3


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r[1]["reward_model"].update(ground_truth=""), r"row 1: field 'reward_model.ground_truth'"),
        (lambda r: r[2]["reward_model"].pop("ground_truth"), r"row 2: field 'reward_model.ground_truth'"),
        (lambda r: r[0].update(prompt=[]), r"row 0: field 'prompt'"),
        (lambda r: r[1].update(data_source="openai/gsm8k"), r"row 1: field 'data_source'.*no verifier"),
    ],
)
def test_bad_rows_are_named(tmp_path, mutate, expected):
    rows = _rows()
    mutate(rows)
    path = _write(tmp_path, rows)
    with pytest.raises(DatasetError, match=expected) as err:
        validate_dataset(path)
    assert str(err.value).startswith(path)


@pytest.mark.parametrize("mutate", [lambda r: r[1].update(prompt=[]), lambda r: r[1].update(data_source="x")])
def test_training_and_evaluation_name_a_bad_row_in_the_same_words(tmp_path, mutate):
    from l2t_verl.evaluation import EvaluationError, load_problems

    rows = _rows()
    mutate(rows)
    path = _write(tmp_path, rows)
    with pytest.raises(DatasetError) as training:
        validate_dataset(path)
    with pytest.raises(EvaluationError) as evaluation:
        load_problems(path)
    assert str(training.value) == str(evaluation.value)
    assert str(training.value).startswith(f"{path}: row 1: field ")


def test_missing_file_and_column(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        validate_dataset(tmp_path / "nope.parquet")
    rows = [{k: v for k, v in r.items() if k != "reward_model"} for r in _rows()]
    with pytest.raises(DatasetError, match="missing column 'reward_model'"):
        validate_dataset(_write(tmp_path, rows))


@pytest.mark.slow
def test_main_stops_before_any_worker_with_one_line(tmp_path):
    data = _write(tmp_path, _rows())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "l2t_verl.main",
            "preset=cpu",
            "algo=l2t",
            "l2t.penalty.rank=0",
            f"data.train_files={data}",
            f"data.val_files={data}",
            "actor_rollout_ref.model.path=unused",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "l2t-verl: configuration error: l2t.penalty.rank must be an integer >= 1; got 0"
    assert "ray" not in proc.stdout.lower()  # Ray was never started


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    config_dir = str(Path(__file__).resolve().parents[1] / "l2t_verl" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("l2t_trainer", overrides=["preset=cpu", *overrides])


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        # adv_estimator=l2t under verl's own trainer used to train plain GRPO to the end, exit code 0
        (
            ["algo=l2t", "trainer.v1.trainer_mode=sync"],
            "algorithm.adv_estimator=l2t needs trainer.v1.trainer_mode=l2t",
        ),
        (["algo=grpo", "trainer.v1.trainer_mode=l2t"], "algorithm.adv_estimator must be l2t"),
        (["algo=l2t", "actor_rollout_ref.rollout.n=1"], "actor_rollout_ref.rollout.n must be >= 2"),
        (["algo=l2t", "algorithm.use_kl_in_reward=true"], "algorithm.use_kl_in_reward"),
        (["algo=l2t", "l2t.penalty.clip=0"], "l2t.penalty.clip"),
        (["algo=l2t", "l2t.penalty.normalize=mean"], "l2t.penalty.normalize"),
    ],
)
def test_silent_fallbacks_are_refused_at_start_up(overrides, start):
    from l2t_verl.main import prepare_config

    with pytest.raises(L2TConfigError) as err:
        prepare_config(_compose(*overrides, "actor_rollout_ref.model.path=unused"))
    assert str(err.value).startswith(start) and "\n" not in str(err.value)


def test_answer_suffix_merging_with_the_next_character_is_refused_at_start_up(tmp_path, tiny_tokenizer):
    from l2t_verl.main import prepare_config

    # The tiny tokenizer has learnt "}." as one token from "\boxed{42}.".
    assert len(tiny_tokenizer.encode("}.", add_special_tokens=False)) == 1
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    config = _compose("algo=l2t", f"actor_rollout_ref.model.path={tmp_path / 'model'}")
    with pytest.raises(
        L2TConfigError, match=r"^l2t\.progress\.answer_suffix='}' merges with a following '\.'"
    ):
        prepare_config(config)
    # The default L2T settings pass the other checks: with a suffix the tokenizer keeps apart, the next
    # stop is the dataset check.
    data = _write(tmp_path, _rows())
    config = _compose(
        "algo=l2t",
        f"actor_rollout_ref.model.path={tmp_path / 'model'}",
        "l2t.progress.answer_suffix='}.'",
        f"data.train_files={data}",
        f"data.val_files={tmp_path / 'missing.parquet'}",
    )
    with pytest.raises(DatasetError, match="missing.parquet"):
        prepare_config(config)
