"""The ``l2t`` agent loop: verl's single-turn rollout plus episode segmentation and J_r probes.

Select it with ``actor_rollout_ref.rollout.agent.default_agent_loop=l2t`` (verl uses that name for
every row without an ``agent_name`` column; a dataset row's ``agent_name`` overrides it per row).

Per response (docs/method.md §§1-2, 8):

1. generate exactly as verl's ``single_turn_agent`` does (chat template, one request);
2. when ``l2t.enable``: cut the response into episodes (``l2t.episodes``) on its own token ids;
3. when ``l2t.progress.enable`` too: send the K+1 J_r probes to the SAME server, through the same
   ``server_manager`` with the generation's request id, so the load balancer's sticky session
   routes them to the replica that holds the response's KV blocks (``l2t_verl.progress``). The local
   ``hf`` server reads them; vLLM does not for prompt log-prob requests unless
   ``l2t.progress.prefix_cache`` is on (docs/method.md §2);
4. write the results into ``AgentLoopOutput.extra_fields`` as the sample's
   :class:`~l2t_verl.record.SampleRecord` (that module owns the field names).

How those fields reach the driver, and why probes bypass the fully-async client's resume loop:
docs/architecture.md.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient

from l2t_verl import faults
from l2t_verl.episodes import segment_episodes
from l2t_verl.progress import ProgressResult, compute_progress
from l2t_verl.record import SampleRecord
from l2t_verl.settings import L2TConfig, L2TConfigError

__all__ = ["L2T_AGENT_LOOP", "L2TAgentLoop", "l2t_config_of"]

logger = logging.getLogger(__name__)

L2T_AGENT_LOOP = "l2t"

_CONFIG_CACHE: dict[int, tuple[Any, L2TConfig]] = {}


def l2t_config_of(trainer_config: Any) -> L2TConfig:
    """The validated ``l2t`` settings of a trainer config (cached per config object: verl builds
    one agent-loop object per sample, all sharing the worker's config)."""
    cached = _CONFIG_CACHE.get(id(trainer_config))
    if cached is not None and cached[0] is trainer_config:
        return cached[1]
    node = trainer_config.get("l2t") if hasattr(trainer_config, "get") else None
    if node is None:
        raise L2TConfigError(
            "l2t: the `l2t` agent loop needs the l2t config group (run l2t_verl.main, whose config "
            "l2t_trainer.yaml defines it)"
        )
    cfg = L2TConfig.from_config(node)
    _CONFIG_CACHE[id(trainer_config)] = (trainer_config, cfg)
    return cfg


class _RequestRecorder:
    """Stands in for the server manager during generation to learn the request id verl picked
    (the probes reuse it for sticky routing); everything else is delegated."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.request_ids: list[str] = []

    async def generate(self, request_id: str, **kwargs: Any) -> Any:
        self.request_ids.append(request_id)
        return await self.inner.generate(request_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _probe_generate_fn(server_manager: Any) -> Any:
    if isinstance(server_manager, FullyAsyncLLMServerClient):
        # Its resume loop returns a fresh TokenOutput without prompt_logprobs; a probe is one
        # short request, so the plain client call is what it needs.
        return LLMServerClient.generate.__get__(server_manager)
    return server_manager.generate


@register(L2T_AGENT_LOOP)
class L2TAgentLoop(SingleTurnAgentLoop):
    """Single-turn generation, then L2T episodes and J_r probes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.l2t = l2t_config_of(self.config)
        # vLLM rejects max_tokens=0; the local hf server takes it and skips generation, which also
        # keeps the probe on its prefix-cached scoring path.
        self.score_max_tokens = 0 if self.rollout_config.get("name") == "hf" else 1
        self.full_determinism = bool(self.rollout_config.get("full_determinism", False))

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        recorder = _RequestRecorder(self.server_manager)
        self.server_manager = recorder
        try:
            output = await super().run(sampling_params, **kwargs)
        finally:
            self.server_manager = recorder.inner
        request_id = recorder.request_ids[-1] if recorder.request_ids else None
        fields = await self._l2t_fields(output, request_id, kwargs)
        output.extra_fields.update(fields)
        return output

    async def _l2t_fields(self, output: AgentLoopOutput, request_id: str | None, row: dict) -> dict[str, Any]:
        cfg = self.l2t
        ends: list[int] = []
        result = ProgressResult()
        if cfg.enable:
            ends = segment_episodes(output.response_ids, self.tokenizer, cfg.episodes)
            if cfg.progress_active and ends:
                result = await compute_progress(
                    output.prompt_ids,
                    output.response_ids,
                    ends,
                    (row.get("reward_model") or {}).get("ground_truth"),
                    cfg.progress,
                    self.tokenizer,
                    self._probe_generate(request_id),
                    data_source=row.get("data_source"),
                    extra_info=row.get("extra_info"),
                    score_max_tokens=self.score_max_tokens,
                    seed=zlib.crc32(str(request_id).encode()) & 0x3FFFFFFF,
                )
                if result.failed:
                    logger.warning("l2t probes failed (outcome reward only): %s", result.error)
        record = SampleRecord(
            episode_ends=tuple(ends),
            jr=tuple(result.jr),
            delta_j=tuple(result.delta_j),
            probe_failed=result.failed,
            probe_error=result.error,
            probe_tokens=result.probe_tokens,
            probe_time_s=result.probe_time_s,
            probe_verifier_errors=result.verifier_errors,
            probe_cache_fallbacks=result.cache_fallbacks,
        )
        return record.to_extra_fields()

    def _probe_generate(self, request_id: str | None) -> Any:
        generate = _probe_generate_fn(self.server_manager)
        counter = itertools.count()
        sticky = request_id or "l2t-probe"

        async def probe(prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
            # The generation's id routes the probe to the replica holding the response's KV blocks
            # (read by the hf server, and by vLLM under l2t.progress.prefix_cache).
            # Under full_determinism verl forwards the id to vLLM as is, and concurrent requests
            # must not share one, so each probe gets its own (deterministic) id there.
            n = next(counter)
            rid = f"{sticky}-l2t{n}" if self.full_determinism else sticky
            if faults.hit("probe", f"{sticky}:{n}"):
                raise faults.InjectedFault(f"probe {n} of request {sticky}")
            return await generate(rid, prompt_ids=prompt_ids, sampling_params=sampling_params)

        return probe
