"""The tiny-run harness (``l2t_verl.tiny_run``) without a trainer: the command it builds, the config that
command composes to, how it runs a process, and the reader of verl's metrics.jsonl it shares with
``l2t_verl.summary``."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

from l2t_verl import tiny_run
from l2t_verl.summary import read_metrics

CONFIG_DIR = Path(__file__).resolve().parents[1] / "l2t_verl" / "config"


def _settings(cmd: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in cmd[3:])


def test_command_sets_paths_steps_and_the_batch_sizes_that_follow_from_batch_and_n():
    cmd = tiny_run.command("assets", "out", "grpo", 5, batch=6, n=3)
    assert cmd[:3] == [sys.executable, "-m", "l2t_verl.main"]
    settings = _settings(cmd)
    assert settings == {
        "preset": "tiny",
        "task": "arith",
        "algo": "grpo",
        "data.train_files": "assets/data/train.parquet",
        "data.val_files": "assets/data/test.parquet",
        "data.train_batch_size": "6",
        "actor_rollout_ref.model.path": "assets/model",
        "actor_rollout_ref.rollout.n": "3",
        "actor_rollout_ref.actor.ppo_mini_batch_size": "6",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "18",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "18",
        "trainer.total_training_steps": "5",
        "trainer.save_freq": "5",
        "trainer.default_local_dir": "out/checkpoints",
    }


def test_command_options_and_overrides_replace_its_own_settings():
    cmd = tiny_run.command(
        Path("/a"),
        Path("/o"),
        "l2t",
        3,
        data_seed=0,
        val_files="/a/data/validation.parquet",
        checkpoint_dir=Path("/o/ckpt"),
        overrides=["trainer.save_freq=-1", "+data.seed=7", "l2t.beta=0"],
    )
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in cmd[3:]]
    assert len(keys) == len(set(keys))  # one value per key, whoever set it
    settings = _settings(cmd)
    assert settings["trainer.save_freq"] == "-1" and settings["+data.seed"] == "7"
    assert "data.seed" not in settings and settings["l2t.beta"] == "0"
    assert settings["data.val_files"] == "/a/data/validation.parquet"
    assert settings["trainer.default_local_dir"] == "/o/ckpt"
    assert cmd[-3:] == ["trainer.save_freq=-1", "+data.seed=7", "l2t.beta=0"]


def test_command_composes_the_cpu_preset_the_tiny_settings_and_the_task():
    from hydra import compose, initialize_config_dir

    longer = ["data.max_response_length=128"]
    cmd = tiny_run.command("assets", "out", "l2t", 2, batch=4, n=2, overrides=longer)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        tiny = compose("l2t_trainer", overrides=cmd[3:])
        cpu = compose("l2t_trainer", overrides=["preset=cpu"])
    assert tiny.trainer.device == cpu.trainer.device == "cpu"  # preset=tiny extends preset=cpu
    assert tiny.actor_rollout_ref.rollout.name == "hf"
    assert tiny.l2t.progress.answer_suffix == "}."  # task=arith
    assert tiny.trainer.v1.trainer_mode == "l2t"  # algo=l2t
    assert list(tiny.trainer.logger) == ["console", "file"]
    assert "hf_model" in tiny.actor_rollout_ref.actor.checkpoint.save_contents
    assert tiny.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 8
    assert (tiny.data.max_prompt_length, tiny.data.max_response_length) == (96, 128)
    assert tiny.data.seed is None


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_run_logs_the_output_and_points_verl_file_logger_at_out(tmp_path):
    stale = tmp_path / "metrics.jsonl"
    stale.write_text(json.dumps({"step": 9, "data": {"old": 1}}) + "\n")
    cmd = _script(
        """
        import json, os, time
        print("hello from the trainer", os.environ["TOKENIZERS_PARALLELISM"], os.environ["EXTRA"])
        with open(os.environ["VERL_FILE_LOGGER_PATH"], "w") as fh:
            for step in (1, 2):
                fh.write(json.dumps({"step": step, "data": {"loss": step / 10}}) + "\\n")
                fh.flush()
                time.sleep(0.3)
        """
    )
    polls = []
    finished = tiny_run.run(
        cmd, tmp_path, env={"EXTRA": "x"}, on_poll=lambda proc, steps: polls.append(len(steps)), poll_s=0.05
    )
    assert finished.returncode == 0 and finished.wall_s > 0.5
    assert finished.log == tmp_path / "train.log"
    assert finished.log.read_text() == "hello from the trainer false x\n"
    assert finished.steps() == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
    assert polls and polls == sorted(polls) and max(polls) <= 2


def test_run_failure_and_timeout(tmp_path):
    failing = _script("import sys; print('line 1'); print('boom'); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"exited with 3; last lines of .*train.log:\nline 1\nboom"):
        tiny_run.run(failing, tmp_path / "a")
    finished = tiny_run.run(failing, tmp_path / "b", check=False)
    assert finished.returncode == 3 and finished.log_tail(1) == "boom"

    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="ran past 0.5 s"):
        tiny_run.run(_script("import time; time.sleep(60)"), tmp_path / "c", timeout_s=0.5)
    assert time.perf_counter() - start < 10


def test_cli_dry_run_prints_the_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--assets", "a", "--out", "o", "--algo", "grpo", "--steps", "2", "--data-seed", "0", "--dry-run"]
    assert tiny_run.main([*argv, "--", "l2t.beta=0"]) == 0
    assert not (tmp_path / "o").exists()
    printed = shlex.split(capsys.readouterr().out)
    assert printed == tiny_run.command("a", "o", "grpo", 2, data_seed=0, overrides=["l2t.beta=0"])


def _record(step: int, **data: float) -> str:
    return json.dumps({"step": step, "data": data})


def test_read_metrics_leaves_out_the_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # not written yet
    path.write_text(_record(1, a=1.0) + "\n\n" + _record(2, a=2.0) + "\n")
    assert read_metrics(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    path.write_text(path.read_text() + _record(3, a=3.0)[:12])  # no newline yet: still being written
    assert read_metrics(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    path.write_text(path.read_text()[: -len(_record(3, a=3.0)[:12])] + _record(3, a=3.0))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]  # complete, newline or not


@pytest.mark.parametrize("bad", ['{"step": 1, "da', '{"step": 1}', '{"step": 1, "data": [1]}', "[1, 2]"])
def test_read_metrics_rejects_a_malformed_line_before_the_last(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_record(1, a=1.0) + "\n" + bad + "\n" + _record(3, a=3.0) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a verl file-logger record"):
        read_metrics(path)
