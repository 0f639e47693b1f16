"""Where L2T's proxy matrices live in a Megatron-core GPT model, and their fp32 values (docs/method.md §3,
"Engines").

P is named by Hugging Face (HF) names on every engine. On tensor-parallel rank i of n:

- ``mlp.gate_proj`` / ``mlp.up_proj`` ``[f, h]``: the first / second half of the rows of the local
  ``mlp.linear_fc1`` ``[2f/n, h]`` (column parallel: Megatron splits gate and up separately and stacks
  ``[gate_i; up_i]`` per rank);
- ``mlp.down_proj`` ``[h, f]`` and ``self_attn.o_proj``: ``mlp.linear_fc2`` / ``self_attention.linear_proj``
  ``[h, f/n]`` (row parallel: the input columns are split).

Layers are found by Megatron's global ``layer_number`` (1-based, counted across pipeline stages), so a
stage's local ``decoder.layers.<j>`` maps to the right HF index. megatron-core is imported lazily.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from l2t_verl.penalty.proxy import mlp_regex

__all__ = [
    "MegatronLocation",
    "ProxyPiece",
    "all_gather_along",
    "fp32_master_weights",
    "gather_hf_matrix",
    "locate_proxy",
    "megatron_location",
    "megatron_proxy_names",
    "tensor_parallel_info",
]

_HF_NAME = re.compile(r"^model\.layers\.(\d+)\.(mlp\.(?:gate|up|down)_proj|self_attn\.o_proj)\.weight$")
# HF module -> (Megatron linear under the decoder layer, parallel style, half of a gated linear_fc1)
_MEGATRON_LINEAR = {
    "mlp.gate_proj": ("mlp.linear_fc1", "column", 0),
    "mlp.up_proj": ("mlp.linear_fc1", "column", 1),
    "mlp.down_proj": ("mlp.linear_fc2", "row", None),
    "self_attn.o_proj": ("self_attention.linear_proj", "row", None),
}
_DECODER_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.\d+$")


# --------------------------------------------------------------------------------------------------
# Names and layout


@dataclass(frozen=True)
class MegatronLocation:
    """Where an HF proxy matrix lives in a Megatron GPT model."""

    layer: int  # 0-based global decoder layer (Megatron's layer_number - 1)
    linear: str  # the Megatron linear under that decoder layer
    parallel: str  # "column" (output rows split over tensor-parallel ranks) or "row" (input columns)
    half: int | None  # 0 = gate, 1 = up: which half of a gated linear_fc1's local rows; None = all


def megatron_location(hf_name: str, *, gated: bool = True) -> MegatronLocation:
    """The Megatron linear (and part of it) holding HF matrix ``hf_name``; ``gated``: the MLP is a GLU
    (``linear_fc1`` = gate and up). Raises ``ValueError`` for a matrix the Megatron penalty does not map."""
    match = _HF_NAME.match(hf_name)
    if match is None:
        raise ValueError(
            "the Megatron penalty maps proxy matrices named model.layers.<i>.mlp.(gate|up|down)_proj.weight "
            f"or model.layers.<i>.self_attn.o_proj.weight; got {hf_name!r}"
        )
    linear, parallel, half = _MEGATRON_LINEAR[match.group(2)]
    if not gated and half is not None:
        if half == 0:
            raise ValueError(f"{hf_name!r}: the model's MLP is not gated, it has no gate_proj")
        half = None  # a plain MLP's linear_fc1 is up_proj alone
    return MegatronLocation(int(match.group(1)), linear, parallel, half)


def megatron_proxy_names(num_layers: int, *, gated: bool = True, modules: str | None = None) -> list[str]:
    """The proxy set P in HF names for a Megatron model of ``num_layers`` decoder layers: the matrices
    matching the ``modules`` regex (``re.search``), or by default the last layer's MLP.

    Reverse mode needs nothing but per-position ops after P (docs/method.md §3), so every matrix must lie
    in the last decoder layer; ``ValueError`` names the regex otherwise, or when it matches nothing."""
    projections = ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj")
    candidates = [
        name
        for i in range(num_layers)
        for name in [f"model.layers.{i}.self_attn.o_proj.weight"]
        + [f"model.layers.{i}.mlp.{p}.weight" for p in projections]
    ]
    regex = modules or mlp_regex([num_layers - 1])
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise ValueError(f"invalid proxy regex {regex!r}: {err}") from err
    names = [n for n in candidates if pattern.search(n)]
    if not names:
        raise ValueError(
            f"proxy regex {regex!r} matches none of the matrices the Megatron penalty maps "
            f"(they look like {candidates[-4:]})"
        )
    early = [n for n in names if megatron_location(n, gated=gated).layer != num_layers - 1]
    if early:
        raise ValueError(
            f"proxy regex {regex!r} selects {early[0]!r}: the Megatron penalty runs in reverse mode, which "
            f"needs every proxy matrix in the last decoder layer ({num_layers - 1})"
        )
    return names


@dataclass(frozen=True)
class ProxyPiece:
    """One HF proxy matrix as it lies on this rank: its Megatron linear and this rank's share of it."""

    hf_name: str
    linear: nn.Module
    location: MegatronLocation
    tp_rank: int
    tp_size: int
    tp_group: Any  # the tensor-parallel process group (None when tp_size == 1)
    sequence_parallel: bool

    def local_rows(self) -> slice:
        """This matrix's rows of the linear's local output (a half of a gated linear_fc1)."""
        if self.location.half is None:
            return slice(None)
        rows = self.linear.weight.shape[0] // 2
        return slice(self.location.half * rows, (self.location.half + 1) * rows)

    def local_weight(self, value: Tensor) -> Tensor:
        """This rank's shard of the HF matrix, from the linear's local ``value`` (e.g. its fp32 master)."""
        return value[self.local_rows()]

    def local_factors(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's share of ``dW_r = U V`` of the whole HF matrix: U's rows (column parallel) or V's
        columns (row parallel) of this shard."""
        if self.location.parallel == "column":
            size = u.shape[0] // self.tp_size
            return u[self.tp_rank * size : (self.tp_rank + 1) * size], v
        size = v.shape[1] // self.tp_size
        return u, v[:, self.tp_rank * size : (self.tp_rank + 1) * size]


def _decoder_layers(chunk: nn.Module) -> dict[int, nn.Module]:
    return {
        int(m.layer_number) - 1: m
        for name, m in chunk.named_modules()
        if _DECODER_LAYER.search(name) and hasattr(m, "layer_number")
    }


def tensor_parallel_info() -> tuple[int, int, Any]:
    """This rank's tensor-parallel rank, the group's size, and the group (None when the size is 1)."""
    from megatron.core import parallel_state as mpu

    size = mpu.get_tensor_model_parallel_world_size()
    group = mpu.get_tensor_model_parallel_group() if size > 1 else None
    return mpu.get_tensor_model_parallel_rank(), size, group


def locate_proxy(chunks: Sequence[nn.Module], hf_names: Sequence[str]) -> dict[str, ProxyPiece]:
    """The proxy matrices held on this rank's pipeline stage (none on a stage without them), by HF name."""
    tp_rank, tp_size, tp_group = tensor_parallel_info()
    pieces = {}
    for chunk in chunks:
        for index, layer in _decoder_layers(chunk).items():
            config = layer.config
            for name in hf_names:
                location = megatron_location(name, gated=bool(config.gated_linear_unit))
                if location.layer != index:
                    continue
                pieces[name] = ProxyPiece(
                    hf_name=name,
                    linear=layer.get_submodule(location.linear),
                    location=location,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                    tp_group=tp_group,
                    sequence_parallel=bool(config.sequence_parallel) and tp_size > 1,
                )
    return pieces


def all_gather_along(tensor: Tensor, group: Any, size: int, dim: int) -> Tensor:
    """The ``size`` ranks' ``tensor`` concatenated along ``dim`` in rank order (itself when ``size == 1``)."""
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_hf_matrix(piece: ProxyPiece, local: Tensor) -> Tensor:
    """The whole HF matrix from every tensor-parallel rank's ``local`` value of the linear (collective
    over the tensor-parallel group: every rank calls it, for the same pieces in the same order)."""
    part = piece.local_weight(local)
    return all_gather_along(
        part, piece.tp_group, piece.tp_size, 0 if piece.location.parallel == "column" else 1
    )


# --------------------------------------------------------------------------------------------------
# fp32 master weights


def _master_copies(optimizer: Any) -> tuple[bool, dict[int, Tensor | None]]:
    """Whether ``optimizer`` is Megatron's distributed optimizer, and its fp32 master (a range of it, for
    the distributed optimizer; None where a precision-aware one keeps it elsewhere) by model parameter."""
    if hasattr(optimizer, "shard_fp32_from_float16_groups"):
        params, masters = optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups
        distributed = True
    elif hasattr(optimizer, "fp32_from_float16_groups"):
        params, masters = optimizer.float16_groups, optimizer.fp32_from_float16_groups
        distributed = False
    else:
        return False, {}
    pairs = zip(chain(*params), chain(*masters), strict=True)
    return distributed, {id(param): master for param, master in pairs}


def fp32_master_weights(params: Sequence[nn.Parameter], optimizer: Any) -> tuple[list[Tensor], int]:
    """The fp32 values of ``params`` (each this rank's tensor-parallel shard, whole), from the optimizer's
    fp32 master copies where it keeps them, and how many fell back to the parameter itself.

    A bf16 parameter moves by rounding-sized steps at lr ~ 1e-6, so ``dW`` must come from the masters
    (docs/method.md §3). Megatron's distributed optimizer splits each master across the data-parallel ranks
    (a contiguous range of the flattened parameter each): every rank writes its range into zeros and one
    all-reduce over the data-parallel group assembles it (a collective: every data-parallel rank calls
    this for the same parameters in the same order). ``Float16OptimizerWithFloat16Params`` keeps whole
    copies. fp32 parameters are their own masters. A precision-aware optimizer keeps the masters inside its
    state in a form not read here: the bf16 parameter is used and counted.
    """
    optimizers = list(getattr(optimizer, "chained_optimizers", None) or ([optimizer] if optimizer else []))
    copies = [(opt, *_master_copies(opt)) for opt in optimizers]
    values, fallbacks = [], 0
    for param in params:
        value = None
        for opt, distributed, masters in copies:
            if distributed and param in getattr(opt, "model_param_gbuf_map", {}):
                if getattr(
                    getattr(opt, "config", None), "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
                ):
                    break  # no master shard here on any rank (the same config everywhere): fall back
                shard = masters.get(id(param))
                full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
                if shard is not None:
                    # Megatron keeps the range map private; it is the only record of which slice of the
                    # parameter this rank's shard holds.
                    span = opt._get_model_param_range_map(param)["param"]
                    full[span.start : span.end] = shard.detach().reshape(-1).float()
                dist.all_reduce(full, group=opt.data_parallel_group)
                value = full.view(param.shape)
                break
            master = None if distributed else masters.get(id(param))
            if master is not None:
                value = master.detach().float().clone()
                break
        if value is None:
            fallbacks += int(param.dtype != torch.float32)
            value = param.detach().float().clone()
        values.append(value)
    return values, fallbacks
