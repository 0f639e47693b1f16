"""The compression penalty on each of verl's training engines: one interface, a backend per engine.

The actor worker (:mod:`l2t_verl.worker_extension`) does the same on every engine (docs/method.md §3):
take P's fp32 values by Hugging Face name (:meth:`snapshot`), build ``dW_r`` against the reference with
:class:`~l2t_verl.penalty.LowRankUpdate`, and get every episode's penalty (:meth:`penalties`). What differs
is where P's values live and how the per-token directional derivatives run:

- :class:`FSDPPenalty` (verl's FSDP2 engine): ``full_tensor()`` of P's DTensor shards (the parameters
  are fp32 there); :func:`~l2t_verl.penalty.episode_penalties` on the whole Hugging Face module
  (``forward_ad`` or ``reverse``).
- :class:`MegatronPenalty` (verl's Megatron engine): the optimizer's fp32 masters, assembled over the
  data-parallel ranks and gathered over the tensor-parallel ones; the reverse method through
  megatron-core's pipeline schedule (:mod:`l2t_verl.penalty.megatron`). Only the last pipeline stage
  holds P; the other stages run their part of the forward.

This module never imports the rollout side; megatron-core is imported only by the Megatron backend.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from tensordict import TensorDict
from torch.distributed.tensor import DTensor

from l2t_verl.penalty import (
    DEFAULT_LOGIT_CHUNK,
    LowRankUpdate,
    episode_penalties,
    proxy_regex,
    select_proxy_params,
)

logger = logging.getLogger(__name__)

EPISODE_IDS_KEY = "l2t_episode_ids"  # per response token: episode index, -1 for the tail


class PenaltyBackend(Protocol):
    """What the actor worker needs from a training engine to compute the penalty."""

    def snapshot(self, *, host: bool = False) -> dict[str, torch.Tensor]:
        """P's fp32 values by Hugging Face name, whole (a collective); empty on ranks without P."""
        ...

    def penalties(self, update: LowRankUpdate | None, data: TensorDict, settings: dict) -> torch.Tensor:
        """Raw penalties ``[B, K_max]`` of this rank's samples (``update`` is None where P is not held)."""
        ...

    @property
    def saves_reference(self) -> bool:
        """Whether this rank writes the penalty's reference into the checkpoint (one rank holding P)."""
        ...


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    # Always a copy (a CPU tensor would otherwise be returned as is, and alias the live weight).
    host = tensor.to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host


def full_fp32(param: torch.Tensor, *, host: bool = False) -> torch.Tensor:
    """An fp32 copy of the whole parameter, on its device or (``host``) in CPU memory."""
    # full_tensor() is a collective over the FSDP mesh: every rank must call it, in the same order.
    value = param.full_tensor() if isinstance(param, DTensor) else param
    value = value.detach().to(torch.float32)
    return to_host(value) if host else value.clone()


def padded_penalty_batch(data: TensorDict) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids, attention_mask, position_ids, episode_ids`` from verl's jagged batch, on
    the CPU (the penalty moves each trimmed micro-batch to the device).

    verl keeps each sample as one unpadded prompt+response sequence; the response is its tail, and
    ``l2t_episode_ids`` holds one entry per response token.
    """
    input_ids = data["input_ids"]
    positions = data["position_ids"]
    episodes = data[EPISODE_IDS_KEY]
    seqs = input_ids.unbind(0) if input_ids.is_nested else list(input_ids)
    pos = positions.unbind(0) if positions.is_nested else list(positions)
    eps = episodes.unbind(0) if episodes.is_nested else list(episodes)
    width = max(int(s.shape[-1]) for s in seqs)
    batch = len(seqs)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    position_ids = torch.zeros(batch, width, dtype=torch.long)
    episode_ids = torch.full((batch, width), -1, dtype=torch.long)
    for i, (seq, p, ep) in enumerate(zip(seqs, pos, eps, strict=True)):
        n, r = int(seq.shape[-1]), int(ep.shape[-1])
        if r > n - 1:
            raise ValueError(f"sample {i}: {r} episode ids for a sequence of {n} tokens")
        ids[i, :n] = seq
        mask[i, :n] = 1
        position_ids[i, :n] = p.reshape(-1)[:n]
        episode_ids[i, n - r : n] = ep
    return ids, mask, position_ids, episode_ids


class FSDPPenalty:
    """The penalty on verl's FSDP2 engine: one Hugging Face module, sharded by FSDP2."""

    def __init__(self, engine: Any, settings: dict, rank: int) -> None:
        self.engine = engine
        self.rank = rank
        self.regex = proxy_regex(
            engine.module,
            modules=settings.get("modules"),
            proxy=settings.get("proxy", "lowrank_svd"),
            random_fraction=settings.get("random_fraction", 0.3),
            seed=settings.get("seed", 0),
        )

    def snapshot(self, *, host: bool = False) -> dict[str, torch.Tensor]:
        proxy = select_proxy_params(self.engine.module, self.regex)
        return {name: full_fp32(p, host=host) for name, p in sorted(proxy.items())}

    def penalties(self, update: LowRankUpdate | None, data: TensorDict, settings: dict) -> torch.Tensor:
        assert update is not None  # every FSDP rank holds the whole of P
        ids, mask, position_ids, episode_ids = padded_penalty_batch(data)
        return episode_penalties(
            self.engine.module,
            update,
            ids,
            mask,
            episode_ids,
            damping=float(settings["damping"]),
            method=settings.get("method", "auto"),
            position_ids=position_ids,
            forward_kwargs={"use_cache": False},
            k_max=int(settings["max_episodes"]),
            max_tokens=int(settings["max_token_len"]),
            logit_chunk=int(settings.get("logit_chunk", DEFAULT_LOGIT_CHUNK)),
        ).float()

    @property
    def saves_reference(self) -> bool:
        return self.rank == 0  # every rank holds the same whole P


class MegatronPenalty:
    """The penalty on verl's Megatron engine (tensor, sequence and pipeline parallel)."""

    def __init__(self, engine: Any, settings: dict) -> None:
        from l2t_verl.penalty.megatron import megatron_schedule
        from l2t_verl.penalty.megatron_layout import locate_proxy, megatron_proxy_names

        if settings.get("proxy") == "random_layers" and not settings.get("modules"):
            raise ValueError("l2t.penalty.proxy=random_layers is not supported on the Megatron engine")
        self.engine = engine
        config = engine.tf_config
        names = megatron_proxy_names(
            int(config.num_layers), gated=bool(config.gated_linear_unit), modules=settings.get("modules")
        )
        self.pieces = locate_proxy(engine.module, names)
        self.schedule = megatron_schedule  # what runs the forward steps: megatron-core's pipeline schedule

    def snapshot(self, *, host: bool = False) -> dict[str, torch.Tensor]:
        from l2t_verl.penalty.megatron_layout import fp32_master_weights, gather_hf_matrix

        names = sorted(self.pieces)
        linears = list({id(self.pieces[n].linear): self.pieces[n].linear for n in names}.values())
        values, fallbacks = fp32_master_weights([m.weight for m in linears], self.engine.optimizer)
        if fallbacks:
            logger.warning("l2t: %d proxy weight(s) read from bf16 parameters, not fp32 masters", fallbacks)
        by_linear = {id(m): v for m, v in zip(linears, values, strict=True)}
        snapshot = {}
        for name in names:
            piece = self.pieces[name]
            whole = gather_hf_matrix(piece, by_linear[id(piece.linear)])
            snapshot[name] = to_host(whole) if host else whole
        return snapshot

    def penalties(self, update: LowRankUpdate | None, data: TensorDict, settings: dict) -> torch.Tensor:
        from l2t_verl.penalty.megatron import megatron_episode_penalties

        ids, mask, position_ids, episode_ids = padded_penalty_batch(data)
        try:
            return megatron_episode_penalties(
                self.engine.module,
                update if self.pieces else None,
                ids,
                mask,
                episode_ids,
                float(settings["damping"]),
                k_max=int(settings["max_episodes"]),
                position_ids=position_ids,
                max_tokens=int(settings["max_token_len"]),
                logit_chunk=int(settings.get("logit_chunk", DEFAULT_LOGIT_CHUNK)),
                schedule=self.schedule,
            )
        finally:
            # megatron-core's own linears after P accumulate weight gradients into Megatron's gradient
            # buffers whatever requires_grad says (fused accumulation); nothing else may see them.
            self.engine.optimizer_zero_grad()

    @property
    def saves_reference(self) -> bool:
        from megatron.core import parallel_state as mpu

        # One rank holding P: the last stage's first tensor- and data-parallel rank.
        return (
            mpu.is_pipeline_last_stage(ignore_virtual=True)
            and mpu.get_tensor_model_parallel_rank() == 0
            and mpu.get_data_parallel_rank() == 0
        )


def penalty_backend(strategy: str, engine: Any, settings: dict, rank: int) -> PenaltyBackend:
    """The backend for verl's ``actor.strategy`` (``fsdp``/``fsdp2`` or ``megatron``)."""
    if strategy == "megatron":
        return MegatronPenalty(engine, settings)
    if strategy in ("fsdp", "fsdp2"):
        return FSDPPenalty(engine, settings, rank)
    raise ValueError(
        f"actor_rollout_ref.actor.strategy={strategy!r}: the L2T penalty runs on fsdp/fsdp2 or megatron"
    )
