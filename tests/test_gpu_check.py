"""``scripts/gpu_check.py``: the one-command GPU check, run end to end on the CPU with ``--tiny``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # several processes / a subprocess each

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _expected_sections() -> list[str]:
    cells = [
        f"perf/{d}/{a}/T{t}"
        for t in gpu_check.TINY.seq_lens
        for d in gpu_check.DTYPES
        for a in gpu_check.ATTENTIONS
    ]
    return ["environment", "build", "accuracy", "hf_engine", "megatron", *cells]


def _has_megatron_core() -> bool:
    return importlib.util.find_spec("megatron") is not None and (
        importlib.util.find_spec("megatron.core") is not None
    )


def _assert_recorded(name: str, record: dict) -> None:
    """Figures, or a skip / failure that says why."""
    assert record["status"] in gpu_check.STATUSES, (name, record)
    if record["status"] == "skipped":
        assert record.get("reason"), (name, record)
    elif record["status"] != "ok":
        assert record.get("error"), (name, record)


def test_tiny_run_records_every_section(tmp_path):
    result = _run(tmp_path)
    assert result["finished"] is True and result["mode"] == "tiny"
    sections = result["sections"]
    assert list(sections) == _expected_sections()
    for name, record in sections.items():
        _assert_recorded(name, record)

    env = sections["environment"]
    assert env["status"] == "ok"
    # The script must run where only torch + transformers are installed.
    assert env["heavy_imports"] == [] and env["import_errors"] == {}

    assert sections["build"]["status"] == "ok" and sections["build"]["tied_embeddings"] is True

    accuracy = sections["accuracy"]
    assert accuracy["status"] == "ok"
    assert len(accuracy["reference"]) == gpu_check.ACC_EPISODES
    for key, variant in accuracy["variants"].items():
        _assert_recorded(key, variant)
    fp32 = accuracy["variants"]["fp32/sdpa/forward_ad"]
    assert fp32["status"] == "ok" and fp32["all_finite"]
    assert fp32["max_rel_err"] < 1e-3, fp32
    assert fp32["inner_sq_max_rel_err"] < 1e-3, fp32

    hf = sections["hf_engine"]
    assert hf["status"] == "ok" and hf["scores_finite"] and hf["as_is_works"]
    assert hf["modes"]["as_is"]["score_fresh"]["max_abs_diff_vs_generate_logprobs"] < 1e-4

    megatron = sections["megatron"]
    if not _has_megatron_core():
        assert megatron["status"] == "skipped" and "megatron.core" in megatron["reason"], megatron
    else:
        assert megatron["status"] == "ok", megatron
        # The CPU run: local spec, a one-stage schedule, no optimizer (megatron-core's needs CUDA).
        assert megatron["spec"] == "local" and megatron["transformer_engine_path"].startswith("unverified")
        assert megatron["masters"]["status"] == "skipped" and "CUDA" in megatron["masters"]["reason"]
        reverse = megatron["reverse"]["local"]
        assert reverse["status"] == "ok" and reverse["all_finite"] and reverse["grads_untouched"]
        shape = gpu_check.megatron_helpers().MEGATRON_TINY
        assert len(reverse["penalties"]) == len(shape.lengths) * shape.episodes
        assert megatron["episodes_scored"] == len(reverse["penalties"]) and min(reverse["penalties"]) > 0
        for key in ("fp32", "fp64"):
            assert megatron["finite_difference"][key]["status"] == "ok", megatron["finite_difference"]
        # Reverse mode (fp32) against central finite differences: fp32 ones carry O(1e-3) noise, fp64
        # ones leave reverse mode's own fp32 rounding.
        assert megatron["passed"] is True
        assert megatron["reverse_vs_fd_fp32_max_rel_err"] < 1e-2, megatron["comparisons"]
        assert megatron["reverse_vs_fd_fp64_max_rel_err"] < 1e-3, megatron["comparisons"]
        check = gpu_check.Check(
            gpu_check.parse_args(["--tiny"]), tmp_path / "x.json", gpu_check.TINY, torch.device("cpu")
        )
        check.sections.update(sections)
        assert "megatron (local spec" in gpu_check.summary_table(check)

    for name, cell in sections.items():
        if not name.startswith("perf/"):
            continue
        if "/flash_attention_2/" in name:
            assert cell["status"] in ("ok", "skipped"), (name, cell)
        else:
            assert cell["status"] == "ok", (name, cell)
        if cell["status"] != "ok":
            continue
        assert cell["logprob_forward"]["status"] == "ok" and cell["logprob_forward"]["best_s"] > 0
        for method in gpu_check.METHODS:
            _assert_recorded(f"{name}/{method}", cell[method])
            if cell[method]["status"] == "ok":
                assert cell[method]["best_s"] > 0 and cell[method]["over_forward"] > 0
                assert cell[method]["all_finite"]


def test_spent_budget_skips_the_rest(tmp_path):
    result = _run(tmp_path, "--budget-s", "0")
    assert list(result["sections"]) == _expected_sections()
    for record in result["sections"].values():
        assert record["status"] == "skipped" and "budget" in record["reason"]


def test_guards_record_failures_and_go_on(tmp_path):
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path / "x.json")])
    check = gpu_check.Check(args, args.out, gpu_check.TINY, torch.device("cpu"))

    def broken() -> dict:
        raise RuntimeError("boom")

    check.run("broken", broken)
    check.run("fine", lambda: {"value": 1})
    saved = json.loads(args.out.read_text())["sections"]
    assert saved["broken"]["status"] == "error" and "boom" in saved["broken"]["error"]
    assert saved["fine"] == {**saved["fine"], "status": "ok", "value": 1}

    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    assert gpu_check.attempt(oom)["status"] == "oom"

    def old_penalty() -> dict:
        raise TypeError("episode_penalties() got an unexpected keyword argument 'logit_chunk'")

    skipped = gpu_check.attempt(old_penalty)
    assert skipped["status"] == "skipped" and "logit_chunk" in skipped["error"]


def test_megatron_section_skips_without_megatron_core(tmp_path, monkeypatch):
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path / "x.json")])
    check = gpu_check.Check(args, args.out, gpu_check.TINY, torch.device("cpu"))
    real_import = gpu_check.importlib.import_module

    def import_module(name: str, *rest):
        if name.startswith("megatron"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *rest)

    monkeypatch.setattr(gpu_check.importlib, "import_module", import_module)
    check.run("megatron", lambda: gpu_check.section_megatron(check))
    record = json.loads(args.out.read_text())["sections"]["megatron"]
    assert record["status"] == "skipped" and "megatron.core is not importable" in record["reason"]
    assert "megatron: skipped" in gpu_check.summary_table(check)
    assert "Transformer Engine path: unverified" in gpu_check.summary_table(check)
