"""The ``l2t`` trainer: verl's synchronous v1 PPO trainer with the L2T steps added (docs/method.md 3-5, 7).

One training step, in verl's order (``PPOTrainer._step_once``):

1. rollout  — agent loop ``l2t`` (:mod:`l2t_verl.agent_loop`, rollout workers): generate, cut into
   episodes, probe J_r at every boundary; each sample's :class:`~l2t_verl.record.SampleRecord` rides
   along in ``extra_fields``;
2. reward   — the ``l2t`` reward manager's outcome verifier gives ``r_out``;
3. old log-prob — as in verl;
4. **penalty** — :meth:`L2TTrainer._compute_penalty`: the actor workers
   (:class:`~l2t_verl.worker_extension.L2TActorRolloutRefWorker`) return the raw Fisher penalties
   ``p_k`` per rewarded episode of their own samples;
5. **advantage** — :meth:`L2TTrainer._compute_advantage` reads the records, outcomes and penalties and
   hands them to :func:`l2t_verl.step.l2t_step` (``p_hat``, ``r_k``, the process-supervised GRPO
   advantage, the ``l2t/`` metrics);
6. actor update — as in verl (the worker first keeps P's pre-update copy as the next reference).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer
from verl.workers.utils.padding import response_to_nested

from l2t_verl.episodes import episode_ids_for
from l2t_verl.record import SampleRecord, read_records
from l2t_verl.settings import L2TConfig
from l2t_verl.step import JrHealth, StepResult, l2t_step
from l2t_verl.worker_extension import (
    EPISODE_IDS_KEY,
    PENALTY_KEY,
    PENALTY_SETTINGS_KEY,
    L2TActorRolloutRefWorker,
)

_ACTOR_ROLES = (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor)


def _extra(fields: Any, n: int) -> list[dict]:
    """The per-sample ``extra_fields`` dicts as read back from TransferQueue."""
    if fields is None:
        return [{} for _ in range(n)]
    fields = fields.tolist() if hasattr(fields, "tolist") else list(fields)
    return [dict(f) if isinstance(f, dict) else {} for f in fields]


@register_trainer("l2t")
class L2TTrainer(PPOTrainerSync):
    def __init__(self, config) -> None:
        self.l2t = L2TConfig.from_config(config)
        self._jr_health = JrHealth()
        self._step_records: tuple[tuple, tuple[list[SampleRecord], int, torch.Tensor]] | None = None
        super().__init__(config)

    # verl selects a trainer class by ``trainer.v1.trainer_mode`` and then branches on
    # ``trainer_mode == "sync"`` (replay buffer, refill of failed groups, TransferQueue checkpoints,
    # the ``trainer.v1.sync`` settings). Registered as "l2t", this is still the synchronous loop, so it
    # reports "sync" to those branches; verl's own assignment in ``__init__`` is ignored.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        pass

    # ------------------------------------------------------------------ workers

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        # Same hybrid worker as verl's, plus the penalty; swapped in rather than patched.
        for role in _ACTOR_ROLES:
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(L2TActorRolloutRefWorker)

    # ------------------------------------------------------------------ step

    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        with marked_timer("l2t_penalty", self.timing_raw, color="purple"):
            batch = self._compute_penalty(batch, metrics)
        return batch

    def _records(self, batch) -> tuple[list[SampleRecord], int, torch.Tensor]:
        """Every sample's checked :class:`SampleRecord`, the number found malformed, the response lengths.

        Read once per step: the penalty and the advantage phases of the same batch share the result (so a
        malformed record is also logged once)."""
        # TransferQueue keys may repeat across steps, so the step number is part of the cache key.
        keys = (self.global_steps, batch.partition_id, tuple(batch.keys))
        if self._step_records is not None and self._step_records[0] == keys:
            return self._step_records[1]
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields", "response_mask"]
        )
        extras = _extra(data.get("extra_fields", None), len(batch))
        lengths = data["response_mask"].offsets().diff()
        records, malformed = read_records(
            extras, lengths.tolist(), self.l2t.progress_active, self.l2t.episodes.max_episodes
        )
        self._step_records = (keys, (records, malformed, lengths))
        return records, malformed, lengths

    def _compute_penalty(self, batch, metrics: dict):
        k_max = self.l2t.episodes.max_episodes
        if not self.l2t.penalty_active:
            return batch
        start = time.perf_counter()
        records, _, lengths = self._records(batch)
        progress = self.l2t.progress_active
        # Only rewarded episodes get a penalty: a response whose probes failed gets its outcome only,
        # so its tokens are all marked "no episode" (-1) and cost the actor nothing.
        episode_ids = torch.nested.as_nested_tensor(
            [
                torch.tensor(
                    episode_ids_for(int(n), [] if progress and r.probe_failed else r.episode_ends),
                    dtype=torch.long,
                )
                for n, r in zip(lengths.tolist(), records, strict=True)
            ],
            layout=torch.jagged,
        )
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({EPISODE_IDS_KEY: episode_ids}, batch_size=len(batch)),
        )
        penalty = self.l2t.penalty
        settings = {
            "proxy": penalty.proxy,
            "modules": penalty.modules,
            "rank": penalty.rank,
            "damping": penalty.damping,
            "reference": penalty.reference,
            "random_fraction": penalty.random_fraction,
            "seed": penalty.seed,
            "max_episodes": k_max,
            "method": penalty.method,
            "logit_chunk": penalty.logit_chunk,
            # Padded tokens per penalty micro-batch: by default the budget verl gives its own per-GPU
            # log-prob forward, so the penalty fits wherever compute_log_prob does.
            "max_token_len": penalty.max_token_len
            or self.config.actor_rollout_ref.rollout.get("log_prob_max_token_len_per_gpu")
            or 16384,
        }
        # The worker reads exactly these fields of the batch (a view: the TQ data is not copied).
        view = KVBatchMeta(
            keys=batch.keys,
            tags=batch.tags,
            partition_id=batch.partition_id,
            fields=["input_ids", "position_ids", EPISODE_IDS_KEY],
            extra_info=dict(batch.extra_info),
        )
        view.extra_info[PENALTY_SETTINGS_KEY] = settings
        self.actor_rollout_wg.compute_l2t_penalty(view)
        metrics["l2t/penalty_time_s"] = time.perf_counter() - start
        return batch

    def _compute_advantage(self, batch, metrics: dict):
        fields = ["uid", "response_mask", "rm_scores"] + (["input_ids"] if self.l2t.dump_dir else [])
        if self.l2t.penalty_active:
            fields.append(PENALTY_KEY)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        sequences = data.pop("input_ids") if self.l2t.dump_dir else None
        padded = data.to_padded_tensor()
        uid = np.array(padded.pop("uid").tolist(), dtype=object)
        response_mask = padded["response_mask"]
        records, malformed, lengths = self._records(batch)
        outcomes = _outcomes(records, padded["rm_scores"].float(), lengths)

        result = l2t_step(
            records,
            outcomes,
            response_mask,
            uid,
            self.l2t,
            raw_penalties=padded[PENALTY_KEY] if self.l2t.penalty_active else None,
            norm_adv_by_std_in_grpo=bool(self.config.algorithm.get("norm_adv_by_std_in_grpo", True)),
        )
        nested = response_to_nested(result.advantages, response_mask_nested)
        batch = tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({"advantages": nested, "returns": nested.clone()}, batch_size=len(batch)),
        )
        metrics.update(result.metrics)
        metrics["l2t/malformed_records"] = float(malformed)
        self._jr_health.update(result.metrics)
        if sequences is not None:
            self._dump(sequences, uid, records, outcomes, result, response_mask)
        return batch

    def _dump(self, sequences, uid, records, outcomes, result: StepResult, response_mask) -> None:
        """One JSON line per sample to ``l2t.dump_dir/step_N.jsonl``. ``sequence_sha1`` (of prompt +
        response token ids) identifies a sample across runs, where verl's ``uid`` is random."""
        folder = Path(self.l2t.dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = sequences.unbind(0) if sequences.is_nested else list(sequences)
        with (folder / f"step_{self.global_steps}.jsonl").open("w") as fh:
            for i, (seq, record) in enumerate(zip(rows, records, strict=True)):
                tokens = seq.reshape(-1).tolist()
                n = int(response_mask[i].sum())
                k = record.num_episodes
                row = {
                    "uid": str(uid[i]),
                    "sequence_sha1": hashlib.sha1(json.dumps(tokens).encode()).hexdigest(),
                    "response_tokens": n,
                    "response_ids": tokens[len(tokens) - n :],
                    "episode_ends": list(record.episode_ends),
                    "rewarded": result.episode_mask[i, :k].tolist(),
                    "jr": list(record.jr),
                    "delta_j": list(record.delta_j),
                    "probe_failed": record.probe_failed,
                    "probe_error": record.probe_error,
                    "outcome": float(outcomes[i]),
                    "penalty_raw": result.penalty_raw[i, :k].tolist(),
                    "penalty_hat": result.penalty_hat[i, :k].tolist(),
                    "process_reward": result.process_rewards[i, :k].tolist(),
                    "process_reward_normalized": result.normalized_process[i, :k].tolist(),
                    "advantages": result.advantages[i][response_mask[i].bool()].tolist(),
                }
                fh.write(json.dumps(row) + "\n")


def _outcomes(records: list[SampleRecord], scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r_out per sample: the ``l2t`` reward manager's outcome; with any other manager, the scalar verl
    put on the last response token."""
    last = scores[torch.arange(len(records)), (lengths - 1).clamp(min=0)]
    values = [float(r.outcome) if r.outcome is not None else float(last[i]) for i, r in enumerate(records)]
    return torch.tensor(values, dtype=torch.float32)
