"""Turn whatever the user points at into a directory ``from_pretrained`` (and vLLM) can load.

Accepted, most specific first:

- a HF model directory (``config.json`` + weights);
- a verl actor directory ``.../global_step_N/actor``: its ``huggingface/`` subfolder when the trainer
  saved ``hf_model`` there (verl always writes config + tokenizer to it, weights only on request),
  otherwise the FSDP shards ``model_world_size_W_rank_R.pt`` merged by verl's model merger;
- a step directory ``.../global_step_N`` (its ``actor/``);
- a trainer output directory (``trainer.default_local_dir``): the step named in
  ``latest_checkpointed_iteration.txt``, else the highest ``global_step_N``;
- ``hf:ORG/NAME``: a Hugging Face Hub id, passed through to the loader (the only non-local form, so
  a mistyped local path is reported as missing instead of being looked up on the Hub).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from l2t_verl.evaluation.errors import EvaluationError

__all__ = ["HUB_PREFIX", "find_step_dir", "is_hf_model_dir", "merge_fsdp_checkpoint", "resolve_model"]

HUB_PREFIX = "hf:"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_STEP_RE = re.compile(r"global_step_(\d+)$")
_SHARD_RE = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt$")
# Written last into a merged directory: a merge that was interrupted is never mistaken for a finished one.
_MERGE_MARKER = "l2t_merge.json"


def is_hf_model_dir(path: Path) -> bool:
    """A directory holding ``config.json`` and model weights."""
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.search(path.name)
    return int(m.group(1)) if m else None


def find_step_dir(root: Path) -> Path:
    """The ``global_step_N`` directory a trainer output directory points at."""
    tracker = root / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise EvaluationError(f"{tracker}: expected a step number, got {text!r}")
        step_dir = root / f"global_step_{int(text)}"
        if not step_dir.is_dir():
            raise EvaluationError(f"{tracker}: names step {text} but {step_dir} does not exist")
        return step_dir
    steps = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    if not steps:
        raise EvaluationError(f"{root}: no global_step_* checkpoint directories")
    return max(steps, key=lambda p: _step_of(p) or 0)


def _shards(actor: Path) -> list[Path]:
    return sorted(p for p in actor.iterdir() if _SHARD_RE.match(p.name))


def _fingerprint(actor: Path) -> dict[str, list[float]]:
    # Size and mtime of every shard: a checkpoint overwritten in place gets merged again.
    return {p.name: [p.stat().st_size, p.stat().st_mtime] for p in _shards(actor)}


def merge_fsdp_checkpoint(actor: Path, target: Path, trust_remote_code: bool = False) -> Path:
    """Merge an FSDP actor checkpoint into ``target`` with ``python -m verl.model_merger``.

    Reuses ``target`` when a previous merge of the same shards finished there. The merge runs in a
    subprocess: importing verl registers its plugins (platforms, patches) in the importing process,
    which an evaluation process does not want. Note that verl's merger writes bfloat16 weights.
    """
    actor, target = Path(actor), Path(target)
    shards = _shards(actor)
    if not shards:
        raise EvaluationError(f"{actor}: no model_world_size_*_rank_*.pt shards to merge")
    if not (actor / "fsdp_config.json").is_file():
        raise EvaluationError(f"{actor}: missing fsdp_config.json (needed by verl's merger)")
    if not (actor / "huggingface" / "config.json").is_file():
        raise EvaluationError(f"{actor}: missing huggingface/config.json (needed by verl's merger)")
    fingerprint = _fingerprint(actor)
    marker = target / _MERGE_MARKER
    if marker.is_file() and is_hf_model_dir(target):
        try:
            if json.loads(marker.read_text()).get("shards") == json.loads(json.dumps(fingerprint)):
                return target
        except ValueError:
            pass
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        str(actor),
        "--target_dir",
        str(tmp),
    ]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not is_hf_model_dir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}, no weights written"
        raise EvaluationError(f"{actor}: verl model merger failed: {why}")
    (tmp / _MERGE_MARKER).write_text(json.dumps({"source": str(actor), "shards": fingerprint}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model(
    path: str | Path, merge_dir: str | Path | None = None, trust_remote_code: bool = False
) -> str:
    """Return a loadable HF model directory (or Hub id) for ``path``; see the module docstring.

    FSDP shards are merged into ``merge_dir`` (default: ``<actor dir>/huggingface_merged``).
    Raises :class:`EvaluationError` naming the path when it is none of the accepted forms.
    """
    text = str(path)
    if text.startswith(HUB_PREFIX):
        repo = text[len(HUB_PREFIX) :]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise EvaluationError(f"{text}: a Hub model must be given as {HUB_PREFIX}ORG/NAME")
        return repo
    p = Path(path)
    if not p.exists():
        raise EvaluationError(
            f"{p}: model path does not exist (give a HF model dir, a verl checkpoint dir, "
            f"or {HUB_PREFIX}ORG/NAME for a Hub model)"
        )
    if not p.is_dir():
        raise EvaluationError(f"{p}: model path is a file; expected a directory")
    if is_hf_model_dir(p):
        return str(p)
    if (p / "latest_checkpointed_iteration.txt").is_file() or (
        _step_of(p) is None and any(_step_of(c) is not None for c in p.iterdir() if c.is_dir())
    ):
        p = find_step_dir(p)
    if _step_of(p) is not None:
        if not (p / "actor").is_dir():
            raise EvaluationError(f"{p}: checkpoint step has no actor/ directory")
        p = p / "actor"
    hf = p / "huggingface"
    if is_hf_model_dir(hf):
        return str(hf)
    if _shards(p):
        target = Path(merge_dir) if merge_dir is not None else p / "huggingface_merged"
        return str(merge_fsdp_checkpoint(p, target, trust_remote_code=trust_remote_code))
    if (
        (p / "model" / "huggingface").is_dir()
        or (p / "dist_ckpt").is_dir()
        or (p / "model" / "dist_ckpt").is_dir()
    ):
        raise EvaluationError(
            f"{p}: Megatron checkpoint; merge it first with `python -m verl.model_merger merge "
            f"--backend megatron --local_dir {p} --target_dir DIR` and pass DIR"
        )
    raise EvaluationError(
        f"{p}: neither a HF model dir (config.json + weights) nor a verl checkpoint (global_step_*/actor)"
    )
