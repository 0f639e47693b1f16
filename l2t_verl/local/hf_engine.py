"""Token-in/token-out generation and prompt scoring on a HF causal LM, for the local `hf` rollout.

This is the compute core of :class:`l2t_verl.local.hf_server.HFRolloutServer`, kept free of Ray so it
can be tested directly. It does what verl asks of a rollout engine, at CPU scale:

- batched sampling for many requests at once (left padding, one KV cache), each request with its own
  temperature / top-p / top-k / max tokens / stop tokens / seed, returning per-token log-probs;
- requests with the same prompt (verl sends the ``rollout.n`` samples of a prompt as separate requests)
  share one prefill: the prompt's KV rows are computed once and copied;
- prompt scoring (vLLM's ``prompt_logprobs``): the log-prob of every prompt token, with the KV cache
  of the longest previously seen prefix reused, so scoring ``response[:b] + suffix`` after generating
  ``response`` costs ``len(suffix)`` new tokens, not ``b``, unless the request sets
  ``skip_reading_prefix_cache``. The L2T J_r probes get this reuse here by default; on vLLM only under
  ``l2t.progress.prefix_cache`` (docs/method.md §2).

Log-probs of sampled tokens follow verl's ``logprobs_mode=processed_logprobs``: log-softmax of the
logits divided by the temperature (what verl's actor recomputes). Prompt log-probs are taken at
temperature 1, the model's own distribution.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel


class RequestError(ValueError):
    """A request the engine cannot serve (empty, too long, bad sampling parameter)."""


@dataclass
class SamplingSpec:
    """The sampling parameters the engine honours, parsed from verl/vLLM-style ``sampling_params``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    prompt_logprobs: int | None = None
    # vLLM's per-request switch; here it only matters for prompt scoring, whose log-probs are complete
    # either way (the cache keeps every token's log-prob). None: read the cache.
    skip_reading_prefix_cache: bool | None = None
    seed: int | None = None
    n: int = 1

    # Keys verl or vLLM may send that change nothing for a CPU engine.
    _IGNORED = frozenset(
        {"detokenize", "skip_special_tokens", "spaces_between_special_tokens", "min_p", "extra_args"}
    )

    @classmethod
    def parse(cls, params: dict[str, Any], default_max_tokens: int) -> SamplingSpec:
        params = dict(params)
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", default_max_tokens))
        spec = cls(max_tokens=int(max_tokens))
        for key, value in params.items():
            if key in cls._IGNORED or value is None:
                continue
            if key == "stop_token_ids":
                spec.stop_token_ids = tuple(int(t) for t in value)
            elif key == "logprobs":
                # vLLM takes an int (top-k count); verl sends a bool. Either way: log-prob of the sample.
                spec.logprobs = value is not False
            elif key in ("temperature", "top_p", "repetition_penalty"):
                setattr(spec, key, float(value))
            elif key in ("top_k", "n", "seed", "prompt_logprobs"):
                setattr(spec, key, int(value))
            elif key in ("ignore_eos", "skip_reading_prefix_cache"):
                setattr(spec, key, bool(value))
            else:
                raise RequestError(f"unsupported sampling parameter {key!r}={value!r}")
        if spec.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {spec.temperature}")
        if not 0 < spec.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {spec.top_p}")
        if spec.n < 1:
            raise RequestError(f"n must be >= 1, got {spec.n}")
        if spec.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {spec.repetition_penalty}")
        return spec


@dataclass
class Completion:
    token_ids: list[int]
    log_probs: list[float] | None
    finish_reason: str  # "stop" (eos / stop token) or "length"


@dataclass
class _Row:
    """One sequence being decoded in a batch."""

    prompt: tuple[int, ...]
    spec: SamplingSpec
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    raw_logps: list[float] = field(default_factory=list)
    done: str | None = None


@dataclass
class _CacheEntry:
    """KV tensors of one sequence, per layer ``(k, v)`` of shape [1, heads, len, dim], plus the
    temperature-1 log-probs of its tokens 1..len (index i is the log-prob of token i+1)."""

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    token_logps: list[float]


class HFEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        eos_token_ids: list[int],
        pad_token_id: int,
        max_model_len: int,
        max_batch_size: int = 64,
        prefix_cache_entries: int = 256,
        seed: int = 0,
    ) -> None:
        self.model = model.eval()
        # Inputs follow the model onto its device (a CUDA GPU under scripts/gpu_check.py); sampling
        # stays on CPU generators so that a seed gives the same tokens on any device.
        self.device = next(model.parameters()).device
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.prefix_cache_entries = prefix_cache_entries
        self._prefix_cache: OrderedDict[tuple[int, ...], _CacheEntry] = OrderedDict()
        self._generator = torch.Generator().manual_seed(seed)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "score_tokens": 0, "score_cached_tokens": 0}

    # ------------------------------------------------------------------ validation

    def check_prompt(self, prompt_ids: list[int], spec: SamplingSpec) -> None:
        if len(prompt_ids) == 0:
            raise RequestError("empty prompt: at least one token is required")
        headroom = 0 if spec.prompt_logprobs is not None else 1
        if len(prompt_ids) + headroom > self.max_model_len:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens does not fit max_model_len={self.max_model_len}"
                + (" with room for one generated token" if headroom else "")
            )
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy actor weights (HF names) into the model; returns how many tensors were loaded."""
        # state_dict (not named_parameters) so that tied weights are addressable by either name.
        targets = self.model.state_dict(keep_vars=True)
        unknown = [name for name, _ in named_tensors if name not in targets]
        if unknown:
            raise KeyError(f"weight update names not in the rollout model: {unknown[:5]}")
        for name, tensor in named_tensors:
            target = targets[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"weight update {name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}"
                )
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        self.clear_prefix_cache()
        return len(named_tensors)

    def clear_prefix_cache(self) -> None:
        self._prefix_cache.clear()

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, requests: list[tuple[list[int], SamplingSpec]]) -> list[list[Completion]]:
        """Sample completions for a batch of requests; result ``[i][j]`` is sample j of request i."""
        rows: list[_Row] = []
        owners: list[int] = []
        for i, (prompt, spec) in enumerate(requests):
            self.check_prompt(prompt, spec)
            if spec.max_tokens < 1:
                raise RequestError(f"max_tokens must be >= 1 to generate, got {spec.max_tokens}")
            for j in range(spec.n):
                gen = None
                if spec.seed is not None:
                    gen = torch.Generator().manual_seed(spec.seed + j)
                rows.append(_Row(tuple(int(t) for t in prompt), spec, gen))
                owners.append(i)
        results: list[list[Completion]] = [[] for _ in requests]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            self._decode(chunk)
            for row, owner in zip(chunk, owners[start : start + len(chunk)], strict=True):
                results[owner].append(
                    Completion(row.out, row.logps if row.spec.logprobs else None, row.done or "length")
                )
        return results

    def _decode(self, rows: list[_Row]) -> None:
        # One prefill per distinct prompt; rows with the same prompt get copies of its KV rows.
        unique: dict[tuple[int, ...], int] = {}
        for row in rows:
            unique.setdefault(row.prompt, len(unique))
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            past_key_values=cache,
            use_cache=True,
        )
        self.stats["prefill_tokens"] += int(mask.sum())
        prompt_logps = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        select = torch.tensor([unique[row.prompt] for row in rows], device=self.device)
        cache.batch_select_indices(select)
        mask = mask[select]
        logits = out.logits[select, -1].float()
        row_prompt_logps = prompt_logps[select]

        budget = [min(r.spec.max_tokens, self.max_model_len - len(r.prompt)) for r in rows]
        for _ in range(max(budget)):
            tokens = torch.full((len(rows),), self.pad_token_id, dtype=torch.long, device=self.device)
            for b, row in enumerate(rows):
                if row.done is not None:
                    continue
                token, logp, raw = self._sample(logits[b], row)
                row.out.append(token)
                row.logps.append(logp)
                row.raw_logps.append(raw)
                tokens[b] = token
                if (
                    not row.spec.ignore_eos and token in self.eos_token_ids
                ) or token in row.spec.stop_token_ids:
                    row.done = "stop"
                elif len(row.out) >= budget[b]:
                    row.done = "length"
            if all(row.done is not None for row in rows):
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                past_key_values=cache,
                use_cache=True,
            )
            self.stats["decode_tokens"] += sum(1 for r in rows if r.done is None)
            logits = out.logits[:, -1].float()

        self._remember(rows, cache, mask, row_prompt_logps)

    def _sample(self, logits: torch.Tensor, row: _Row) -> tuple[int, float, float]:
        spec = row.spec
        raw = torch.log_softmax(logits, -1)
        if spec.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt) | set(row.out)), device=logits.device)
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(
                picked > 0, picked / spec.repetition_penalty, picked * spec.repetition_penalty
            )
        if spec.temperature == 0:
            token = int(torch.argmax(logits))
            return token, float(torch.log_softmax(logits, -1)[token]), float(raw[token])
        scores = logits / spec.temperature
        logp = torch.log_softmax(scores, -1)
        if 0 < spec.top_k < scores.numel():
            kth = torch.topk(scores, spec.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if spec.top_p < 1.0:
            # Same rule as HF's TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
            # always keeping the most likely token.
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - spec.top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), -math.inf)
        probs = torch.softmax(scores, -1)
        token = int(torch.multinomial(probs.cpu(), 1, generator=row.generator or self._generator))
        return token, float(logp[token]), float(raw[token])

    def _remember(
        self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, prompt_logps: torch.Tensor
    ):
        """Keep each finished sequence's KV rows so later scoring of its prefixes starts from them."""
        if self.prefix_cache_entries <= 0:
            return
        for b, row in enumerate(rows):
            ids = row.prompt + tuple(row.out[:-1])  # the last sampled token was never fed back
            # Valid positions in feeding order: the (left padded) prompt, then the sampled tokens.
            fed = mask[b].bool().nonzero().flatten()[: len(ids)]
            kv = [(layer.keys[b : b + 1, :, fed], layer.values[b : b + 1, :, fed]) for layer in cache.layers]
            plen = len(row.prompt)
            prompt_part = prompt_logps[b, prompt_logps.shape[1] - (plen - 1) :].tolist() if plen > 1 else []
            token_logps = prompt_part + row.raw_logps[:-1]
            self._store(_CacheEntry(ids, kv, token_logps))

    def _store(self, entry: _CacheEntry) -> None:
        self._prefix_cache[entry.ids] = entry
        self._prefix_cache.move_to_end(entry.ids)
        while len(self._prefix_cache) > self.prefix_cache_entries:
            self._prefix_cache.popitem(last=False)

    # ------------------------------------------------------------------ scoring

    def _longest_prefix(self, ids: tuple[int, ...]) -> tuple[_CacheEntry | None, int]:
        best, best_len = None, 0
        for entry in reversed(self._prefix_cache.values()):
            n = min(len(entry.ids), len(ids) - 1)  # keep >= 1 new token to produce the next logits
            if n <= best_len:
                continue
            common = _common_prefix_len(entry.ids, ids, n)
            if common > best_len:
                best, best_len = entry, common
        if best is not None:
            # A hit keeps the entry alive: the probes of one response come one after another, and
            # an entry evicted between them would be re-prefilled from scratch.
            self._prefix_cache.move_to_end(best.ids)
        return best, best_len

    @torch.no_grad()
    def score(self, prompt_ids: list[int], read_cache: bool = True) -> tuple[list[float], int]:
        """Log-prob of each prompt token given the ones before it (index i is token i+1).

        Returns the log-probs and the number of prompt tokens whose KV was reused from the cache
        (0 with ``read_cache=False``, which computes the whole prompt; the result is still cached).
        """
        self.check_prompt(prompt_ids, SamplingSpec(max_tokens=0, prompt_logprobs=0))
        ids = tuple(int(t) for t in prompt_ids)
        if len(ids) == 1:
            return [], 0
        entry, common = self._longest_prefix(ids) if read_cache else (None, 0)
        # Keep one shared token out of the reused KV: feeding it again yields the logits that predict
        # the first token after the shared prefix, which the cache entry does not store.
        keep = max(common - 1, 0)
        if entry is not None and keep > 0:
            kv = [(k[:, :, :keep].clone(), v[:, :, :keep].clone()) for k, v in entry.kv]
            cache = DynamicCache(ddp_cache_data=kv, config=self.model.config)
            known = entry.token_logps[:keep]
        else:
            cache, keep, known = DynamicCache(config=self.model.config), 0, []
        new = torch.tensor(ids[keep:], device=self.device)[None]
        out = self.model(
            input_ids=new,
            position_ids=torch.arange(keep, len(ids), device=self.device)[None],
            past_key_values=cache,
            use_cache=True,
        )
        self.stats["score_tokens"] += new.shape[1]
        self.stats["score_cached_tokens"] += keep
        # logits at position p predict token p+1.
        targets = torch.tensor(ids[keep + 1 :], device=self.device)
        logps = torch.log_softmax(out.logits[0, : len(targets)].float(), -1)
        token_logps = known + logps.gather(-1, targets[:, None])[:, 0].tolist()
        self._store(_CacheEntry(ids, [(layer.keys, layer.values) for layer in cache.layers], token_logps))
        return token_logps, keep


def _common_prefix_len(a: tuple[int, ...], b: tuple[int, ...], n: int) -> int:
    """Length of the common prefix of ``a`` and ``b`` within their first ``n`` items.

    Tuple slices compare in C, so a binary search over them costs O(n log n) machine work and
    O(log n) Python steps; a per-entry tensor comparison was most of the scoring time for probes.
    """
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, as in HF generate with left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
