"""A verl platform for machines without an accelerator: device ``cpu``, collectives over gloo.

verl 0.9.1 only ships CUDA/NPU/ROCm platforms and falls back to CUDA + NCCL elsewhere. This one is
registered under the name ``cpu``. Auto-detection probes the built-in platforms first, so on a GPU
node nothing changes; ``VERL_PLATFORM=cpu`` forces it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _zero(*_: Any, **__: Any) -> int:
    return 0


def _nothing(*_: Any, **__: Any) -> None:
    return None


def _cpu_device_module() -> ModuleType:
    """``torch.cpu`` plus the memory/RNG calls verl makes on ``get_torch_device()``.

    verl treats the device module like ``torch.cuda`` (memory_reserved, empty_cache, get_rng_state,
    ...). ``torch.cpu`` lacks most of these; on CPU they have nothing to report or release.
    """
    module = ModuleType("l2t_verl_cpu_device")
    module.__dict__.update({k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("_")})
    for name in (
        "memory_allocated",
        "memory_reserved",
        "max_memory_allocated",
        "max_memory_reserved",
    ):
        setattr(module, name, _zero)
    for name in (
        "empty_cache",
        "reset_peak_memory_stats",
        "reset_accumulated_memory_stats",
        "ipc_collect",
        "manual_seed",
        "manual_seed_all",
    ):
        setattr(module, name, _nothing)
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_rng_state = torch.get_rng_state
    module.set_rng_state = torch.set_rng_state
    module.mem_get_info = lambda *_: (_total_memory(), _total_memory())
    module.get_device_name = lambda *_: "CPU"
    module.current_device = lambda: "cpu"
    return module


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


_DEVICE_MODULE = _cpu_device_module()


def _has_accelerator() -> bool:
    if torch.cuda.is_available() or shutil.which("nvidia-smi") or shutil.which("rocm-smi"):
        return True
    return hasattr(torch, "npu")


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """CPU platform. Ray still schedules workers on a ``GPU`` resource (see ``ray_resource_name``)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return not _has_accelerator()

    def current_device(self) -> str:  # type: ignore[override]
        # verl passes this straight to ``tensor.to(...)``; an int would mean "accelerator 0".
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for the fake GPUs it hands out; reading it is harmless on CPU.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # verl's resource pools count "GPU"s; the CPU preset declares some with ray_init.num_gpus, so the
        # same placement logic (one worker per device) runs unchanged.
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def cpu_platform_active() -> bool:
    """True when this process runs verl on :class:`PlatformCPU` (forced or auto-detected)."""
    forced = os.environ.get("VERL_PLATFORM", "").strip().lower()
    if forced:
        return forced == "cpu"
    return not _has_accelerator()
