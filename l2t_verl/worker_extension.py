"""Actor side of L2T: the compression penalty (docs/method.md §3) computed inside verl's actor workers.

:class:`L2TActorRolloutRefWorker` is verl's own hybrid ``ActorRolloutRefWorker`` with two additions, the
same on every training engine (the engine-specific part is :mod:`l2t_verl.engine_penalty`):

- ``compute_l2t_penalty`` (dispatched per data-parallel shard, like ``compute_log_prob``): each rank
  holding P takes P's fp32 values by Hugging Face name, builds the rank-r SVD proxy of their update
  ``dW_r``, and gets every episode's ``<dW_r, g_k>`` from one pass per micro-batch over its own samples,
  then ``p_k = <dW_r, g_k>^2 + damping * ||dW_r||^2``;
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
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker

from l2t_verl import faults
from l2t_verl.engine_penalty import EPISODE_IDS_KEY, PenaltyBackend, penalty_backend, to_host
from l2t_verl.penalty import LowRankUpdate

logger = logging.getLogger(__name__)

__all__ = ["EPISODE_IDS_KEY", "L2TActorRolloutRefWorker", "PENALTY_KEY", "PENALTY_SETTINGS_KEY"]

PENALTY_SETTINGS_KEY = "l2t_penalty_settings"  # non-tensor entry the trainer attaches to the batch
PENALTY_KEY = "l2t_penalty_raw"  # output: [B, K_max] raw penalties
L2T_STATE_FILE = "l2t_state.pt"  # in the actor's checkpoint folder: the penalty reference


class L2TActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker plus the L2T compression penalty."""

    _l2t_settings: dict | None = None
    _l2t_reference: dict[str, torch.Tensor] | None = None
    _l2t_calls = 0

    _l2t_backend: PenaltyBackend | None = None

    def _l2t_penalty_backend(self) -> PenaltyBackend:
        if self._l2t_backend is None:
            strategy = str(self.config.actor.strategy)
            self._l2t_backend = penalty_backend(strategy, self.actor.engine, self._l2t_settings, self.rank)
        return self._l2t_backend

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_l2t_penalty(self, data: TensorDict) -> TensorDict:
        settings = tu.get_non_tensor_data(data=data, key=PENALTY_SETTINGS_KEY, default=None)
        if settings is None:
            raise KeyError(f"compute_l2t_penalty needs the non-tensor entry {PENALTY_SETTINGS_KEY!r}")
        self._l2t_settings = dict(settings)
        k_max = int(settings["max_episodes"])
        batch = len(data)
        # Everything that touches the parameters runs inside the engine's eval mode: under parameter
        # offload that is what brings them back onto the device (and the gathers are collectives).
        with self.actor.engine.eval_mode():
            backend = self._l2t_penalty_backend()
            current = backend.snapshot()  # empty on a pipeline stage without P
            if self._l2t_reference is None and settings["reference"] == "initial":
                self._l2t_reference = {k: to_host(v) for k, v in current.items()}
            if self._l2t_reference is None:
                # Step 1 under `previous_step`: no update yet, so every penalty is exactly 0.
                return TensorDict({PENALTY_KEY: torch.zeros(batch, k_max)}, batch_size=[batch])
            update = None
            if current:
                update = LowRankUpdate.from_tensors(
                    current, self._l2t_reference, rank=int(settings["rank"]), seed=int(settings["seed"])
                )
            penalties = backend.penalties(update, data, self._l2t_settings)
            del current, update
        self._l2t_calls += 1
        keys = [f"{self._l2t_calls}:{self.rank}:{i}" for i in range(batch)]
        penalties = faults.poison(penalties, "penalty_nan", keys)
        return TensorDict({PENALTY_KEY: penalties}, batch_size=[batch])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        # The penalty's reference is optimizer-like state: without it a resumed run would start with a
        # zero update (previous_step) or a new origin (initial). It holds the whole of P by Hugging Face
        # name, so one rank holding P writes it next to the actor's shards (every rank reads it back), and
        # the checkpoint manager's clean-up removes it with them.
        # A reference implies settings (it is taken or restored with them), hence a backend to ask.
        if self._l2t_reference is not None and self._l2t_penalty_backend().saves_reference:
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
                self._l2t_reference = self._l2t_penalty_backend().snapshot(host=True)
        return super().update_actor(data)
