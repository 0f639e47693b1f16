"""Actor side of L2T: the compression penalty (docs/method.md §3) computed inside verl's actor workers.

:class:`L2TActorRolloutRefWorker` is verl's own hybrid ``ActorRolloutRefWorker`` with two additions:

- ``compute_l2t_penalty`` (dispatched per data-parallel shard, like ``compute_log_prob``): each rank
  gathers only the proxy matrices P, builds the rank-r SVD proxy of their update ``dW_r``, and gets every
  episode's ``<dW_r, g_k>`` from one pass per micro-batch over its own samples
  (:func:`l2t_verl.penalty.episode_penalties`; micro-batches cut by a token budget and trimmed to their
  own longest sequence, the output layer's log-softmax in chunks of positions), then
  ``p_k = <dW_r, g_k>^2 + damping * ||dW_r||^2``;
- ``update_actor`` first copies P (only P) as the reference of the next step's update
  (``reference: previous_step``). The reference lives in (pinned) CPU memory: it is only read once per
  step, and on the device it would sit through rollout while the inference engine wakes up.

The trainer (:mod:`l2t_verl.trainer`) swaps this class in for verl's; nothing in verl is patched. This
module never imports the rollout side.
"""

from __future__ import annotations

import logging
import os

import torch
from tensordict import TensorDict
from torch.distributed.tensor import DTensor
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker

from l2t_verl import faults
from l2t_verl.penalty import (
    LowRankUpdate,
    episode_penalties,
    proxy_regex,
    select_proxy_params,
)

logger = logging.getLogger(__name__)

PENALTY_SETTINGS_KEY = "l2t_penalty_settings"  # non-tensor entry the trainer attaches to the batch
EPISODE_IDS_KEY = "l2t_episode_ids"  # per response token: episode index, -1 for the tail
PENALTY_KEY = "l2t_penalty_raw"  # output: [B, K_max] raw penalties
L2T_STATE_FILE = "l2t_state.pt"  # in the actor's checkpoint folder: the penalty reference


def _full(param: torch.Tensor, *, host: bool = False) -> torch.Tensor:
    """An fp32 copy of the whole parameter, on its device or (``host``) in CPU memory."""
    # full_tensor() is a collective over the FSDP mesh: every rank must call it, in the same order.
    value = param.full_tensor() if isinstance(param, DTensor) else param
    value = value.detach().to(torch.float32)
    return _to_host(value) if host else value.clone()


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    # Always a copy (a CPU tensor would otherwise be returned as is, and alias the live weight).
    host = tensor.to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host


def padded_penalty_batch(data: TensorDict) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids, attention_mask, position_ids, episode_ids`` from verl's jagged batch, on
    the CPU (``episode_penalties`` moves each trimmed micro-batch to the device).

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


class L2TActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker plus the L2T compression penalty."""

    _l2t_settings: dict | None = None
    _l2t_reference: dict[str, torch.Tensor] | None = None
    _l2t_calls = 0

    def _l2t_proxy(self) -> dict[str, torch.nn.Parameter]:
        module = self.actor.engine.module
        s = self._l2t_settings
        regex = proxy_regex(
            module,
            modules=s.get("modules"),
            proxy=s.get("proxy", "lowrank_svd"),
            random_fraction=s.get("random_fraction", 0.3),
            seed=s.get("seed", 0),
        )
        return select_proxy_params(module, regex)

    def _l2t_snapshot(self, *, host: bool = False) -> dict[str, torch.Tensor]:
        return {name: _full(p, host=host) for name, p in sorted(self._l2t_proxy().items())}

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_l2t_penalty(self, data: TensorDict) -> TensorDict:
        settings = tu.get_non_tensor_data(data=data, key=PENALTY_SETTINGS_KEY, default=None)
        if settings is None:
            raise KeyError(f"compute_l2t_penalty needs the non-tensor entry {PENALTY_SETTINGS_KEY!r}")
        self._l2t_settings = dict(settings)
        k_max = int(settings["max_episodes"])
        batch = len(data)
        # Everything that touches the parameters runs inside the engine's eval mode: under parameter
        # offload that is what brings them back onto the device (and full_tensor() is a collective
        # over the device mesh).
        with self.actor.engine.eval_mode():
            current = self._l2t_snapshot()
            if self._l2t_reference is None and settings["reference"] == "initial":
                self._l2t_reference = {k: _to_host(v) for k, v in current.items()}
            if self._l2t_reference is None:
                # Step 1 under `previous_step`: no update yet, so every penalty is exactly 0.
                return TensorDict({PENALTY_KEY: torch.zeros(batch, k_max)}, batch_size=[batch])
            update = LowRankUpdate.from_tensors(
                current, self._l2t_reference, rank=int(settings["rank"]), seed=int(settings["seed"])
            )
            ids, mask, position_ids, episode_ids = padded_penalty_batch(data)
            penalties = episode_penalties(
                self.actor.engine.module,
                update,
                ids,
                mask,
                episode_ids,
                damping=float(settings["damping"]),
                method=settings.get("method", "auto"),
                position_ids=position_ids,
                forward_kwargs={"use_cache": False},
                k_max=k_max,
                max_tokens=int(settings["max_token_len"]),
                logit_chunk=int(settings.get("logit_chunk", 1024)),
            ).float()
            del current, update
        self._l2t_calls += 1
        keys = [f"{self._l2t_calls}:{self.rank}:{i}" for i in range(batch)]
        penalties = faults.poison(penalties, "penalty_nan", keys)
        return TensorDict({PENALTY_KEY: penalties}, batch_size=[batch])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        # The penalty's reference is optimizer-like state: without it a resumed run would start with a
        # zero update (previous_step) or a new origin (initial). Every rank holds the full P, so rank 0
        # writes it next to the actor's shards, and the checkpoint manager's clean-up removes it with them.
        if self.rank == 0 and self._l2t_reference is not None:
            state = {"reference": self._l2t_reference, "settings": self._l2t_settings}
            torch.save(state, os.path.join(local_path, L2T_STATE_FILE))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        path = os.path.join(local_path, L2T_STATE_FILE) if local_path else None
        state = torch.load(path, map_location="cpu") if path and os.path.exists(path) else None
        super().load_checkpoint(local_path, hdfs_path, del_local_after_load)
        if state is not None:
            self._l2t_reference = state["reference"]
            self._l2t_settings = state["settings"]
            logger.info("l2t: penalty reference restored from %s", path)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data: TensorDict) -> TensorDict:
        if self._l2t_settings is not None and self._l2t_settings["reference"] == "previous_step":
            # W_ref of the next step's penalty = P as it is before this step's optimizer update
            # (in eval mode for the same reason as in compute_l2t_penalty).
            with self.actor.engine.eval_mode():
                self._l2t_reference = self._l2t_snapshot(host=True)
        return super().update_actor(data)
