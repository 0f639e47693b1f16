"""A tiny training run with verl's real trainer on CPU, on the offline assets (:mod:`l2t_verl.assets`).

The quickstart, the end-to-end tests and the CPU benchmarks all start their runs here, so they train
the same configuration: ``preset=tiny task=arith`` (``config/preset/tiny.yaml`` holds what they share)
plus what each of them varies: the paths, the number of steps, the batch, the data seed and its own
Hydra overrides.

    python -m l2t_verl.tiny_run --assets assets --out outputs/run --algo l2t --steps 6 [-- OVERRIDE ...]

writes the trainer's output to ``OUT/train.log`` and verl's per-step metrics to ``OUT/metrics.jsonl``
(read them with :func:`l2t_verl.summary.read_metrics`); ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from l2t_verl.summary import read_metrics

CONFIG = ("preset=tiny", "task=arith")  # with algo=ALGO, the config groups of every tiny run
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"


def command(
    assets: str | Path,
    out: str | Path,
    algo: str,
    steps: int,
    *,
    batch: int = 8,
    n: int = 4,
    data_seed: int | None = None,
    val_files: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> list[str]:
    """``python -m l2t_verl.main`` for ``steps`` steps of ``batch`` prompts x ``n`` samples of ``algo``.

    ``assets`` is a folder built by :func:`l2t_verl.assets.build_all` (its model, its train split, and
    its test split for validation unless ``val_files`` names another). The final step saves a
    checkpoint in ``checkpoint_dir`` (default ``OUT/checkpoints``). ``data_seed=None`` leaves verl's
    data order unseeded. An entry of ``overrides`` replaces the setting of the same key made here, so
    every key appears once.
    """
    assets = Path(assets)
    val_files = assets / "data" / "test.parquet" if val_files is None else val_files
    checkpoint_dir = Path(out) / "checkpoints" if checkpoint_dir is None else checkpoint_dir
    defaults = [
        f"data.train_files={assets / 'data' / 'train.parquet'}",
        f"data.val_files={val_files}",
        f"data.train_batch_size={batch}",
        *([f"data.seed={data_seed}"] if data_seed is not None else []),
        f"actor_rollout_ref.model.path={assets / 'model'}",
        f"actor_rollout_ref.rollout.n={n}",
        # One optimizer step per training step, so the penalty's previous-step reference is exactly the
        # last update (docs/method.md) and every method takes the same number of updates; one micro-batch
        # of all batch x n responses, since a step this small needs no splitting on CPU.
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch * n}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch * n}",
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={steps}",
        f"trainer.default_local_dir={checkpoint_dir}",
    ]
    overridden = {_key(o) for o in overrides}
    kept = [d for d in defaults if _key(d) not in overridden]
    return [sys.executable, "-m", "l2t_verl.main", *CONFIG, f"algo={algo}", *kept, *overrides]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass(frozen=True)
class Finished:
    """A trainer run that has exited."""

    returncode: int
    wall_s: float
    log: Path
    metrics: Path

    def steps(self) -> list[dict]:
        return read_metrics(self.metrics)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def run(
    cmd: Sequence[str],
    out: str | Path,
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_poll: Callable[[subprocess.Popen, list[dict]], None] | None = None,
    poll_s: float = 0.5,
    check: bool = True,
) -> Finished:
    """Run ``cmd`` (from :func:`command`) to the end, its output in ``OUT/train.log`` and verl's file
    logger writing ``OUT/metrics.jsonl`` (a previous run's file is removed first, so that its steps
    cannot be read as this run's). ``env`` adds to the environment.

    ``on_poll(proc, steps)`` is called every ``poll_s`` while the trainer runs, with the steps logged so
    far. Past ``timeout_s`` the trainer is killed and ``TimeoutError`` raised; with ``check``, a non-zero
    exit raises ``RuntimeError`` with the end of the log.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log, metrics = out / LOG_FILE, out / METRICS_FILE
    metrics.unlink(missing_ok=True)
    full_env = {
        **os.environ,
        "VERL_FILE_LOGGER_PATH": str(metrics.resolve()),  # the trainer may run in another cwd
        "RAY_DEDUP_LOGS": "0",  # every worker's lines in the log, not one per group of alike workers
        "TOKENIZERS_PARALLELISM": "false",  # silences the tokenizers warning in every forked worker
        **(env or {}),
    }
    start = time.perf_counter()
    deadline = None if timeout_s is None else start + timeout_s
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            _wait(proc, deadline, on_poll, poll_s, metrics)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"the trainer ran past {timeout_s} s and was killed; log: {log}") from None
        except BaseException:
            # As subprocess.run does: an interrupted caller leaves no trainer behind.
            proc.kill()
            proc.wait()
            raise
    finished = Finished(proc.returncode, time.perf_counter() - start, log, metrics)
    if check and finished.returncode != 0:
        raise RuntimeError(
            f"the trainer exited with {finished.returncode}; last lines of {log}:\n{finished.log_tail()}"
        )
    return finished


def _wait(
    proc: subprocess.Popen,
    deadline: float | None,
    on_poll: Callable[[subprocess.Popen, list[dict]], None] | None,
    poll_s: float,
    metrics: Path,
) -> None:
    """Wait for ``proc``; raises ``subprocess.TimeoutExpired`` at the deadline."""
    while True:
        wait_s = poll_s if on_poll is not None else None
        if deadline is not None:
            left = max(0.0, deadline - time.perf_counter())
            wait_s = left if wait_s is None else min(wait_s, left)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            if deadline is not None and time.perf_counter() >= deadline:
                raise
        if on_poll is not None:
            on_poll(proc, read_metrics(metrics))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--assets", type=Path, default=Path("assets"), help="built by python -m l2t_verl.assets"
    )
    parser.add_argument("--out", type=Path, required=True, help="log, metrics.jsonl and checkpoints")
    parser.add_argument("--algo", default="l2t", help="l2t | grpo | length_penalty")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (GRPO group size)")
    parser.add_argument("--data-seed", type=int, default=None, help="data order; unseeded if not given")
    parser.add_argument("--dry-run", action="store_true", help="print the trainer command, run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for python -m l2t_verl.main")
    args = parser.parse_args(argv)
    cmd = command(
        args.assets,
        args.out,
        args.algo,
        args.steps,
        batch=args.batch,
        n=args.n,
        data_seed=args.data_seed,
        overrides=args.overrides,
    )
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return run(cmd, args.out, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
