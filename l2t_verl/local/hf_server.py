"""The `hf` rollout backend: a Ray actor serving token-in/token-out requests with HF transformers.

verl's agent loops talk to rollout servers through ``server.generate.remote(prompt_ids=...,
sampling_params=..., request_id=...) -> TokenOutput`` and the trainer drives them with
sleep/wake_up/clear_kv_cache; this actor answers the same calls as verl's vLLM server, so nothing
upstream knows it is on a CPU. Concurrent requests are queued and served in batches by one loop.

Prompt scoring uses vLLM's convention: ``sampling_params["prompt_logprobs"] = 0`` returns
``extra_fields["prompt_logprobs"]`` as ``[[logp(token 1)], ..., [logp(token L-1)], [0.0]]`` and the
generation part is skipped when ``max_tokens`` is 0. Unlike vLLM, the prefix cache is read for such a
request unless it sets ``skip_reading_prefix_cache=True``, and the list is always complete.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from typing import Any

import ray
import torch
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from l2t_verl.local.hf_engine import HFEngine, RequestError, SamplingSpec

logger = logging.getLogger(__name__)


class HFRolloutServer:
    """One rollout server (one replica). Created by :class:`HFReplica`."""

    def __init__(self, config, model_config, replica_rank: int = 0, max_batch_size: int = 64) -> None:
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig, RolloutConfig

        self.config: RolloutConfig = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = replica_rank
        self.max_batch_size = max_batch_size
        self.global_steps: int | None = None
        self.engine: HFEngine | None = None
        self.weight_version = 0
        self._seen_step: int | None = None
        self._seen: dict[tuple, int] = {}
        self._queue: asyncio.Queue | None = None
        self._loop_task: asyncio.Task | None = None
        self._engine_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ lifecycle

    async def launch_server(self, **_: Any) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        torch.set_num_threads(max(1, int(os.environ.get("L2T_HF_ROLLOUT_THREADS", torch.get_num_threads()))))
        path = self.model_config.local_path
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, trust_remote_code=self.model_config.trust_remote_code
        )
        eos = _eos_ids(model, path)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos[0]
        try:
            gen_cfg = GenerationConfig.from_pretrained(path)
            if gen_cfg.eos_token_id is not None:
                eos = sorted(set(eos) | set(_as_list(gen_cfg.eos_token_id)))
        except OSError:
            pass
        max_model_len = self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        self.engine = HFEngine(
            model,
            eos_token_ids=eos,
            pad_token_id=pad,
            max_model_len=int(max_model_len),
            max_batch_size=self.max_batch_size,
            seed=int(self.config.seed or 0) + self.replica_rank,
        )
        self._queue = asyncio.Queue()
        self._engine_lock = asyncio.Lock()
        self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    def get_master_address(self):
        return None, None, None

    def get_server_address(self):
        # No HTTP endpoint: requests arrive as Ray calls. verl uses the address only as a server id.
        return f"hf-rollout-{self.replica_rank}", 0

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        if image_data is not None or video_data is not None:
            raise RequestError("the hf rollout backend is text-only; got image/video data")
        prompt_ids = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
        spec = SamplingSpec.parse(sampling_params, default_max_tokens=self.config.response_length)
        extra: dict[str, Any] = {"global_steps": self.global_steps, "weight_version": self.weight_version}
        if spec.prompt_logprobs is not None:
            if spec.prompt_logprobs != 0:
                raise RequestError("prompt_logprobs: only 0 (the prompt tokens' own log-probs) is supported")
            logps, reused = await self._submit("score", (prompt_ids, not spec.skip_reading_prefix_cache))
            extra["prompt_logprobs"] = [[lp] for lp in logps] + [[0.0]]
            extra["prompt_ids"] = [[t] for t in prompt_ids[1:]] + [[0]]
            extra["num_cached_tokens"] = reused
            if spec.max_tokens == 0:
                return TokenOutput(
                    token_ids=[],
                    log_probs=[] if spec.logprobs else None,
                    stop_reason="completed",
                    extra_fields=extra,
                )
        self.engine.check_prompt(prompt_ids, spec)
        if spec.seed is None and self.config.get("full_determinism", False):
            spec.seed = self._deterministic_seed(prompt_ids)
        completions = await self._submit("generate", (prompt_ids, spec))
        first = completions[0]
        if spec.n > 1:
            extra["samples"] = [{"token_ids": c.token_ids, "log_probs": c.log_probs} for c in completions]
        return TokenOutput(
            token_ids=first.token_ids, log_probs=first.log_probs, stop_reason="completed", extra_fields=extra
        )

    def _deterministic_seed(self, prompt_ids: list[int]) -> int:
        """A sampling seed that depends on what is asked, not on when it arrives.

        verl's request ids are random and the order of concurrent requests is not fixed, so under
        ``full_determinism`` request number i (since the last step change) for a given prompt draws
        from seed (config seed, step, prompt, i). The samples of a prompt group are exchangeable,
        so a rerun, or a run resumed from a checkpoint, draws the same set of responses per prompt.
        """
        key = (self.global_steps, tuple(prompt_ids))
        if self._seen_step != self.global_steps:
            self._seen_step, self._seen = self.global_steps, {}
        index = self._seen.get(key, 0)
        self._seen[key] = index + 1
        text = f"{int(self.config.seed or 0)}:{self.global_steps}:{index}:{','.join(map(str, prompt_ids))}"
        return zlib.crc32(text.encode()) & 0x3FFFFFFF

    async def _submit(self, kind: str, payload: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((kind, payload, future))
        return await future

    async def _serve(self) -> None:
        """Take everything queued, run it as one batch in a thread, repeat.

        Running the engine off the event loop keeps the actor answering (and queueing) new requests
        while a batch decodes, so the next batch is as large as the load allows.
        """
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < self.max_batch_size:
                batch.append(self._queue.get_nowait())
            async with self._engine_lock:
                await asyncio.to_thread(self._run_batch, batch)

    def _run_batch(self, batch: list[tuple[str, Any, asyncio.Future]]) -> None:
        loop = self._loop_task.get_loop()

        def settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
            def _set() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(_set)

        gens = [(payload, fut) for kind, payload, fut in batch if kind == "generate"]
        for kind, payload, fut in batch:
            if kind == "score":
                try:
                    settle(fut, self.engine.score(*payload))
                except Exception as exc:  # one bad request must not fail the others
                    settle(fut, error=exc)
        if gens:
            try:
                results = self.engine.generate([p for p, _ in gens])
                for (_, fut), res in zip(gens, results, strict=True):
                    settle(fut, res)
            except Exception:
                # Re-run one by one so the error lands only on the request that caused it.
                for payload, fut in gens:
                    try:
                        settle(fut, self.engine.generate([payload])[0])
                    except Exception as exc:
                        settle(fut, error=exc)

    # ------------------------------------------------------------------ weights and memory

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], last: bool = True) -> int:
        async with self._engine_lock:
            n = await asyncio.to_thread(self.engine.load_weights, named_tensors)
        if last:
            self.weight_version += 1
        return n

    async def get_weights(self) -> dict[str, torch.Tensor]:
        """The server's current weights (tests use it to check that an update arrived)."""
        return {k: v.detach().clone() for k, v in self.engine.model.state_dict().items()}

    async def engine_stats(self) -> dict[str, int]:
        return dict(self.engine.stats)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        # Weights stay resident (CPU memory is not shared with the trainer the way GPU memory is);
        # dropping cached prefixes is what keeps memory flat across steps.
        self.engine.clear_prefix_cache()

    async def clear_kv_cache(self) -> None:
        self.engine.clear_prefix_cache()

    async def release_kv_cache(self) -> None:
        self.engine.clear_prefix_cache()

    async def resume_kv_cache(self) -> None:
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        return {"aborted": 0}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


def _as_list(x: Any) -> list[int]:
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


def _eos_ids(model, path: str) -> list[int]:
    if model.config.eos_token_id is not None:
        return _as_list(model.config.eos_token_id)
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(path).eos_token_id]


def server_actor_name(replica_rank: int, node_rank: int = 0) -> str:
    return f"hf_rollout_server_{replica_rank}_{node_rank}"


class HFReplica(RolloutReplica):
    """Launches one :class:`HFRolloutServer` per replica. Registered as rollout ``hf``."""

    async def launch_servers(self) -> None:
        name = server_actor_name(self.replica_rank) + self.name_suffix
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, max_concurrency=self.max_concurrency, num_cpus=0)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.launch_server.remote()
        self.servers = [server]
        self._server_handle = server
        address, _ = await server.get_server_address.remote()
        self._server_address = address + self.name_suffix

    def rollout_worker_use_gpu(self) -> bool:
        return False
