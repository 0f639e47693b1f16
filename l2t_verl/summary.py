"""Follow and summarise a training run from verl's file logger (``trainer.logger=[...,file]``).

``python -m l2t_verl.summary METRICS.jsonl [--follow --pid PID]`` prints one compact line per step as the
trainer writes it, then a summary: steps, wall time, reward trend, where the checkpoint and logs went, and
a warning when too many responses lost their process reward to failed J_r probes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STEP_KEYS = (
    ("critic/score/mean", "reward"),
    ("l2t/outcome_acc", "acc"),
    ("response_length/mean", "resp_len"),
    ("l2t/episodes_per_response/mean", "episodes"),
    ("l2t/delta_jr_mean", "dJ"),
    ("l2t/penalty_raw_mean", "penalty"),
    ("actor/grad_norm", "grad_norm"),
    ("timing_s/step", "sec"),
)

# Above this share of responses scored on the outcome alone because their probes failed (timeouts
# included), the run is no longer the method it claims to be (docs/method.md §8).
PROBE_FAILURE_WARN_FRACTION = 0.05


def read_metrics(path: str | Path) -> list[dict]:
    """The records of verl's file logger (``VERL_FILE_LOGGER_PATH``), one dict per logged step: the
    step's metrics plus ``"step"``, the step it was logged at. A missing file reads as no step.

    The file is read while the trainer writes it, so an unfinished last line (no newline yet) is left
    out; a malformed line anywhere else raises ``ValueError``, since it means the file is not verl's.
    """
    p = Path(path)
    if not p.exists():
        return []
    text = p.read_text()
    lines = text.split("\n")
    steps = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            data = record["data"]
            if not isinstance(data, dict):
                raise TypeError(f"'data' is a {type(data).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if number == len(lines):  # after the last newline: still being written
                break
            raise ValueError(f"{p}:{number}: not a verl file-logger record ({exc})") from None
        steps.append({"step": record.get("step"), **data})
    return steps


def format_step(record: dict) -> str:
    parts = [f"step {record['step']:>3}"]
    for key, label in STEP_KEYS:
        if key in record and record[key] is not None:
            parts.append(f"{label}={float(record[key]):.4g}")
    return "  ".join(parts)


def follow(path: str | Path, pid: int | None, poll_s: float = 1.0) -> None:
    """Print each new step until the process ``pid`` exits (or forever without a pid)."""
    shown = 0
    while True:
        steps = read_metrics(path)
        for record in steps[shown:]:
            print(format_step(record), flush=True)
        shown = len(steps)
        if pid is not None and not _alive(pid):
            for record in read_metrics(path)[shown:]:
                print(format_step(record), flush=True)
            return
        time.sleep(poll_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def probe_failure_warning(steps: list[dict]) -> str | None:
    """A warning line when more than 5% of the run's responses fell back to the outcome reward because
    their J_r probes failed or timed out (``l2t/probe_failures`` over ``l2t/responses``); else ``None``."""
    counted = [s for s in steps if s.get("l2t/responses") and s.get("l2t/probe_failures") is not None]
    responses = sum(float(s["l2t/responses"]) for s in counted)
    if not responses:
        return None
    failed = sum(float(s["l2t/probe_failures"]) for s in counted)
    if failed / responses <= PROBE_FAILURE_WARN_FRACTION:
        return None
    return (
        f"WARNING: {failed:.0f} of {responses:.0f} responses ({failed / responses:.1%}) got the outcome "
        f"reward only: their J_r probes failed or timed out (l2t/probe_failures). The trainer log names "
        f"each error ('l2t probes failed'); for timeouts raise l2t.progress.timeout_s / timeout_per_probe_s."
    )


def summarize(
    path: str | Path,
    wall_s: float | None = None,
    checkpoint_dir: str | None = None,
    log_file: str | None = None,
) -> str:
    steps = read_metrics(path)
    if not steps:
        return f"no training step was logged to {path}"
    rewards = [s.get("critic/score/mean") for s in steps if s.get("critic/score/mean") is not None]
    lines = ["", "=" * 72, "summary", "=" * 72, f"steps completed : {len(steps)}"]
    if wall_s is not None:
        lines.append(f"wall time       : {wall_s:.0f} s")
    step_time = sum(s.get("timing_s/step", 0.0) for s in steps)
    lines.append(f"time in steps   : {step_time:.1f} s ({step_time / len(steps):.1f} s/step)")
    if rewards:
        half = max(1, len(rewards) // 2)
        first, last = sum(rewards[:half]) / half, sum(rewards[-half:]) / half
        trend = " -> ".join(f"{r:.3f}" for r in rewards)
        lines.append(f"reward per step : {trend}")
        lines.append(f"reward trend    : first half {first:.3f}, last half {last:.3f} ({last - first:+.3f})")
    fallbacks = sum(float(s.get("l2t/probe_cache_fallbacks") or 0.0) for s in steps)
    if fallbacks:
        lines.append(
            f"probe fallbacks : {fallbacks:.0f} probes scored again without the prefix cache "
            f"(l2t/probe_cache_fallbacks)"
        )
    l2t = {k: v for k, v in steps[-1].items() if k.startswith("l2t/")}
    if l2t:
        lines.append("last step l2t/ metrics:")
        lines += [f"  {k} = {float(v):.4g}" for k, v in sorted(l2t.items())]
    lines.append(f"metrics (jsonl) : {Path(path).resolve()}")
    if log_file:
        lines.append(f"trainer log     : {Path(log_file).resolve()}")
    if checkpoint_dir:
        ckpts = sorted(Path(checkpoint_dir).glob("global_step_*"))
        where = ckpts[-1].resolve() if ckpts else f"none saved under {checkpoint_dir}"
        lines.append(f"checkpoint      : {where}")
    warning = probe_failure_warning(steps)
    if warning:
        lines.append(warning)  # last, where it is seen
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics")
    parser.add_argument("--follow", action="store_true")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--wall-s", type=float)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--log-file")
    args = parser.parse_args(argv)
    if args.follow:
        follow(args.metrics, args.pid)
        return
    print(summarize(args.metrics, args.wall_s, args.checkpoint_dir, args.log_file))


if __name__ == "__main__":
    main()
