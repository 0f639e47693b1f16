"""The one place where l2t-verl adjusts behaviour that verl exposes no extension point for.

Each patch is applied only on the CPU platform, is idempotent, and says why it exists.
"""

from __future__ import annotations

import functools
import os

import torch.distributed

_APPLIED = False


def _collapse_duplicate_backends(backend: str | None) -> str | None:
    """``"cpu:gloo,cpu:gloo"`` -> ``"gloo"``.

    verl builds the process-group backend as ``f"cpu:gloo,{device}:{backend}"``
    (verl/utils/distributed.py). With device ``cpu`` and backend ``gloo`` that names the cpu device
    twice, which torch rejects ("Duplicate device type cpu"). The string is built inside verl, so the
    platform cannot avoid it; de-duplicating it where torch receives it covers every call site.
    """
    if not isinstance(backend, str) or "," not in backend:
        return backend
    pairs = [p.strip() for p in backend.split(",") if p.strip()]
    if len({p.split(":", 1)[0] for p in pairs}) == len(pairs):
        return backend
    backends = {p.split(":", 1)[-1] for p in pairs}
    return backends.pop() if len(backends) == 1 else backend


def apply_cpu_patches() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True

    original = torch.distributed.init_process_group

    @functools.wraps(original)
    def init_process_group(backend=None, *args, **kwargs):
        return original(_collapse_duplicate_backends(backend), *args, **kwargs)

    torch.distributed.init_process_group = init_process_group

    # verl looks engines up by (device, vendor) and registers its FSDP engine for cuda/npu only; the
    # engine itself is device-agnostic (FSDP2 on gloo works), so select it through verl's documented
    # environment override rather than re-registering verl's classes.
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")
