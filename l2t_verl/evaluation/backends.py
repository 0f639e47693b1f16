"""Generation backends for evaluation: token ids in, sampled token ids out.

- ``hf``: :class:`l2t_verl.local.hf_engine.HFEngine` in-process (CPU, tests, small models).
- ``vllm``: ``vllm.LLM`` offline inference (GPU). vLLM is imported only when this backend is built,
  so everything else works without it.

Both take already-tokenized prompts, so the evaluation controls tokenization exactly (forced-answer
probes are built by concatenating token ids; decoded text is never re-tokenized, docs/method.md §1).
Sampling is seeded per request (prompt ``i`` gets :func:`request_seed`), so a run is reproducible
and does not depend on how requests are batched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2t_verl.evaluation.errors import EvaluationError

__all__ = [
    "BACKENDS",
    "Generation",
    "GenerationBackend",
    "HFBackend",
    "SamplingConfig",
    "VLLMBackend",
    "make_backend",
    "request_seed",
]

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: ``temperature=0`` is greedy; ``top_k <= 0`` disables top-k."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 1024
    seed: int = 0

    def validate(self) -> SamplingConfig:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise EvaluationError(f"n must be an integer >= 1; got {self.n!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EvaluationError(f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise EvaluationError(f"temperature must be >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise EvaluationError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        return self


@dataclass(frozen=True)
class Generation:
    """One sampled continuation: its token ids (EOS included when it stopped on one)."""

    token_ids: list[int]
    finish_reason: str  # "stop" (EOS / stop token) or "length" (hit max_tokens or the context)


def request_seed(seed: int, index: int, n: int) -> int:
    """Seed of prompt ``index``; its samples use ``seed + j`` (j < n), so no two samples share one."""
    return (seed * 1_000_003 + index * n) % (2**31 - 1)


class GenerationBackend(ABC):
    """What the evaluation needs from an inference engine."""

    name: str
    tokenizer: Any  # a transformers tokenizer of the model
    max_model_len: int | None  # longest prompt + generation the model accepts; None if unknown

    @abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, desc: str = "generating"
    ) -> list[list[Generation]]:
        """``result[i][j]`` is sample ``j`` of prompt ``i`` (``sampling.n`` samples per prompt)."""

    # Deliberately not abstract: a backend holding nothing worth releasing need not override it.
    def close(self) -> None:  # noqa: B027
        """Release the model (GPU memory); the backend must not be used afterwards."""


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.extend(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


class HFBackend(GenerationBackend):
    """HF transformers on CPU (or whatever device the model sits on) through :class:`HFEngine`."""

    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 64,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        tokenizer: Any = None,
        num_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from l2t_verl.local.hf_engine import HFEngine

        if batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1; got {batch_size}")
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        eos = _eos_ids(model, self.tokenizer)
        if not eos:
            raise EvaluationError(
                f"{model_dir}: neither the model config nor the tokenizer names an EOS token"
            )
        pad = model.config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        context = getattr(model.config, "max_position_embeddings", None)
        limits = [x for x in (max_model_len, context) if x]
        self.max_model_len = min(limits) if limits else None
        self.batch_size = batch_size
        if num_threads is not None and num_threads < 1:
            raise EvaluationError(f"num_threads must be >= 1; got {num_threads}")
        self.num_threads = num_threads
        # No prefix cache: evaluation never scores prompts, and caching every sequence's KV costs memory.
        self.engine = HFEngine(
            model,
            eos_token_ids=eos,
            pad_token_id=int(pad),
            max_model_len=self.max_model_len or 1 << 30,
            max_batch_size=batch_size,
            prefix_cache_entries=0,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, desc: str = "generating"
    ) -> list[list[Generation]]:
        import torch

        if self.num_threads is None:
            return self._generate(prompts, sampling, desc)
        # Small models decode one token at a time in tiny ops, where intra-op threads mostly wait on
        # each other (a 0.4M-parameter model runs ~10x faster on 1 thread than on 2 busy cores).
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            return self._generate(prompts, sampling, desc)
        finally:
            torch.set_num_threads(previous)

    def _generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, desc: str
    ) -> list[list[Generation]]:
        from tqdm.auto import tqdm

        from l2t_verl.local.hf_engine import RequestError, SamplingSpec

        sampling.validate()
        n = sampling.n
        # Similar lengths in one batch waste less compute on left padding; per-request seeds keep
        # the samples independent of this order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_batch = max(1, self.batch_size // n)
        results: list[list[Generation]] = [[] for _ in prompts]
        with tqdm(total=len(prompts) * n, desc=desc, unit="seq", leave=False) as bar:
            for start in range(0, len(order), per_batch):
                chunk = order[start : start + per_batch]
                requests = [
                    (
                        [int(t) for t in prompts[i]],
                        SamplingSpec(
                            max_tokens=sampling.max_tokens,
                            temperature=sampling.temperature,
                            top_p=sampling.top_p,
                            top_k=sampling.top_k,
                            seed=request_seed(sampling.seed, i, n),
                            n=n,
                        ),
                    )
                    for i in chunk
                ]
                try:
                    outs = self.engine.generate(requests)
                except RequestError as exc:
                    raise EvaluationError(f"hf backend rejected a request: {exc}") from None
                for i, completions in zip(chunk, outs, strict=True):
                    results[i] = [Generation(list(c.token_ids), c.finish_reason) for c in completions]
                bar.update(len(chunk) * n)
        return results

    def close(self) -> None:
        self.engine = None  # type: ignore[assignment]


class VLLMBackend(GenerationBackend):
    """vLLM offline inference (``vllm.LLM``), for GPUs. ``engine_kwargs`` go to ``vllm.LLM`` as is."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise EvaluationError(
                "backend 'vllm' needs the vllm package, which is not installed "
                "(pip install 'l2t-verl[gpu]' on a GPU machine, or use backend 'hf')"
            ) from None
        from transformers import AutoTokenizer

        self._vllm = vllm
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            # The forced-answer probes all extend a prompt + response prefix that was just sampled.
            enable_prefix_caching=True,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        try:
            self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        except AttributeError:  # engine internals moved: fall back to what was asked for
            self.max_model_len = max_model_len

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, desc: str = "generating"
    ) -> list[list[Generation]]:
        sampling.validate()
        n = sampling.n
        params = []
        for i, prompt in enumerate(prompts):
            max_tokens = sampling.max_tokens
            if self.max_model_len is not None:
                max_tokens = max(1, min(max_tokens, self.max_model_len - len(prompt)))
            extra = {"top_k": sampling.top_k} if sampling.top_k > 0 else {}
            params.append(
                self._vllm.SamplingParams(
                    n=n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                    max_tokens=max_tokens,
                    seed=request_seed(sampling.seed, i, n),
                    **extra,
                )
            )
        # TokensPrompt is a TypedDict: a plain dict with "prompt_token_ids" works across vLLM versions.
        outputs = self.llm.generate(
            [{"prompt_token_ids": [int(t) for t in p]} for p in prompts],
            sampling_params=params,
            use_tqdm=True,
        )
        results = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            results.append(
                [
                    Generation(list(c.token_ids), "stop" if c.finish_reason == "stop" else "length")
                    for c in completions
                ]
            )
        return results

    def close(self) -> None:
        self.llm = None  # type: ignore[assignment]


def make_backend(name: str, model_dir: str | Path, **options: Any) -> GenerationBackend:
    """Build backend ``name`` (``hf`` or ``vllm``) on a HF model directory.

    ``options`` are the backend's keyword arguments (``hf``: batch_size, max_model_len,
    trust_remote_code, tokenizer, num_threads; ``vllm``: tensor_parallel_size,
    gpu_memory_utilization, max_model_len, dtype, trust_remote_code, seed, plus any other
    ``vllm.LLM`` argument).
    """
    if name == "hf":
        allowed = {"batch_size", "max_model_len", "trust_remote_code", "tokenizer", "num_threads"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise EvaluationError(
                f"unknown option {unknown[0]!r} for backend 'hf' (allowed: {sorted(allowed)})"
            )
        return HFBackend(model_dir, **options)
    if name == "vllm":
        return VLLMBackend(model_dir, **options)
    raise EvaluationError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
