"""The trainer-side half of the `hf` rollout: verl's ``BaseRollout`` adapter living in each hybrid worker.

verl's hybrid engine hands every rollout adapter the actor's weights after each update
(``update_weights``) and asks it to release/resume memory around training. Here rank 0 of each replica
forwards the weights to that replica's :class:`~l2t_verl.local.hf_server.HFRolloutServer` in buckets;
every rank still walks the weight generator because materialising an FSDP2 DTensor
(``full_tensor()``) is a collective all ranks must join.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import ray
import torch
from torch.distributed.tensor import DTensor
from verl.workers.rollout.base import BaseRollout

from l2t_verl.local.hf_server import server_actor_name


class HFServerAdapter(BaseRollout):
    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.is_sender = rank % rollout_world_size == 0
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self._server = None

    @property
    def server(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        if self.is_sender:
            await self.server.wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.is_sender:
            await self.server.sleep.remote()

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        **kwargs,
    ) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"the hf rollout takes wire_format='named_tensors', got {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(
                "the hf rollout does not serve LoRA adapters; set model.lora.merge=True"
            )
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in weights:
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            if not self.is_sender:
                continue
            tensor = tensor.detach().to("cpu", copy=True)
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                await self.server.update_weights.remote(bucket, last=False)
                bucket, size = [], 0
        if self.is_sender:
            await self.server.update_weights.remote(bucket, last=True)
            await self.server.clear_kv_cache.remote()
            if global_steps is not None:
                await self.server.set_global_steps.remote(global_steps)
