"""The ``l2t`` config group: typed settings and their start-up validation (docs/method.md §8).

The YAML lives in ``config/l2t_trainer.yaml`` under ``l2t:``; both the rollout side (agent loop, reward
manager) and the actor side (penalty) read it through :func:`L2TConfig.from_config`, so a bad value is
reported once, at start-up, as one line naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from l2t_verl.episodes import EpisodeConfig

DEFAULT_FORCE_SUFFIX = (
    "\n</think>\n\nPlease output the final answer directly based on the above steps.\n\\boxed{"
)


class L2TConfigError(ValueError):
    """A bad ``l2t.*`` setting; the message starts with the full key."""


@dataclass(frozen=True)
class ProgressConfig:
    """J_r probes (docs/method.md §2)."""

    enable: bool = True
    estimator: str = "likelihood"  # likelihood | sampling
    force_suffix: str = DEFAULT_FORCE_SUFFIX
    answer_suffix: str = "}"
    num_samples: int = 4  # M, sampling estimator only
    max_answer_tokens: int = 32  # sampling estimator only
    temperature: float = 1.0  # sampling estimator only
    timeout_s: float = 120.0  # per response, all its probes together: base ...
    timeout_per_probe_s: float = 2.0  # ... plus this much per probe (a long response has many)
    prefix_cache: bool = False  # vLLM: let likelihood probes read the prefix cache (opt-in, see docs)

    def validate(self) -> None:
        _one_of("l2t.progress.estimator", self.estimator, ("likelihood", "sampling"))
        _positive_int("l2t.progress.num_samples", self.num_samples)
        _positive_int("l2t.progress.max_answer_tokens", self.max_answer_tokens)
        if not self.temperature > 0:
            raise L2TConfigError(f"l2t.progress.temperature must be > 0; got {self.temperature!r}")
        if not self.timeout_s > 0:
            raise L2TConfigError(f"l2t.progress.timeout_s must be > 0; got {self.timeout_s!r}")
        if not self.timeout_per_probe_s >= 0:
            raise L2TConfigError(
                f"l2t.progress.timeout_per_probe_s must be >= 0; got {self.timeout_per_probe_s!r}"
            )
        if not isinstance(self.prefix_cache, bool):
            raise L2TConfigError(
                f"l2t.progress.prefix_cache must be true or false; got {self.prefix_cache!r}"
            )

    def probe_timeout_s(self, num_probes: int) -> float:
        """All probes of one response together: the base plus a share per probe."""
        return self.timeout_s + self.timeout_per_probe_s * num_probes


@dataclass(frozen=True)
class PenaltyConfig:
    """Parameter compression penalty (docs/method.md §3)."""

    enable: bool = True
    proxy: str = "lowrank_svd"  # lowrank_svd | random_layers
    modules: str | None = None  # regex over parameter names; None = the last decoder layer's MLP
    rank: int = 8
    damping: float = 1e-5
    reference: str = "previous_step"  # previous_step | initial
    normalize: str = "delta_j"  # delta_j | batch_mean | none (docs/method.md §3)
    clip: float = 10.0  # p_hat <= clip * mean|delta_J| (batch_mean: <= clip)
    random_fraction: float = 0.3  # random_layers only
    seed: int = 0
    method: str = "auto"  # auto | forward_ad | reverse (docs/method.md §3)
    max_token_len: int | None = None  # tokens per penalty micro-batch; None = verl's per-GPU log-prob budget
    logit_chunk: int = 1024  # positions per chunk of the output layer's log-softmax

    def validate(self) -> None:
        _one_of("l2t.penalty.proxy", self.proxy, ("lowrank_svd", "random_layers"))
        _one_of("l2t.penalty.reference", self.reference, ("previous_step", "initial"))
        _one_of("l2t.penalty.normalize", self.normalize, ("delta_j", "batch_mean", "none"))
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not self.clip > 0:
            raise L2TConfigError(f"l2t.penalty.clip must be a number > 0; got {self.clip!r}")
        _positive_int("l2t.penalty.rank", self.rank)
        _one_of("l2t.penalty.method", self.method, ("auto", "forward_ad", "reverse"))
        if self.max_token_len is not None:
            _positive_int("l2t.penalty.max_token_len", self.max_token_len)
        _positive_int("l2t.penalty.logit_chunk", self.logit_chunk)
        if not (isinstance(self.damping, (int, float)) and self.damping > 0):
            raise L2TConfigError(f"l2t.penalty.damping must be > 0; got {self.damping!r}")
        if not 0 < self.random_fraction <= 1:
            raise L2TConfigError(
                f"l2t.penalty.random_fraction must be in (0, 1]; got {self.random_fraction!r}"
            )
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as exc:
                raise L2TConfigError(f"l2t.penalty.modules is not a valid regex: {exc}") from None


@dataclass(frozen=True)
class L2TConfig:
    enable: bool = True
    alpha: float = 0.8
    beta: float = 0.6
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    # Optional folder for per-sample records of every step (episodes, J_r deltas, penalties,
    # advantages): what a user inspects when a run misbehaves, and what the multi-rank test compares.
    dump_dir: str | None = None

    @property
    def penalty_active(self) -> bool:
        return self.enable and self.penalty.enable and self.beta > 0

    @property
    def progress_active(self) -> bool:
        return self.enable and self.progress.enable

    def validate(self) -> L2TConfig:
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise L2TConfigError(f"l2t.{key} must be a number in [0, 100]; got {value!r}")
        try:
            self.episodes.validate()
        except ValueError as exc:
            message = str(exc)
            prefix = "" if message.startswith("l2t.") else "l2t.episodes: "
            raise L2TConfigError(prefix + message) from None
        if self.dump_dir is not None and not (isinstance(self.dump_dir, str) and self.dump_dir.strip()):
            raise L2TConfigError(f"l2t.dump_dir must be a folder path or null; got {self.dump_dir!r}")
        self.progress.validate()
        self.penalty.validate()
        return self

    @classmethod
    def from_config(cls, config: Any) -> L2TConfig:
        """Build from the ``l2t`` node (a DictConfig, a dict, or a full trainer config holding ``l2t``)."""
        node = _to_dict(config)
        if "l2t" in node and isinstance(node["l2t"], dict):
            node = node["l2t"]
        sections = {"episodes": EpisodeConfig, "progress": ProgressConfig, "penalty": PenaltyConfig}
        kwargs: dict[str, Any] = {}
        for key, value in node.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value or {}, f"l2t.{key}")
            elif key in {f.name for f in fields(cls)}:
                kwargs[key] = value
            else:
                raise L2TConfigError(f"l2t.{key} is not a known setting")
        return cls(**kwargs).validate()


def _build(cls: type, values: dict, prefix: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise L2TConfigError(f"{prefix}.{unknown[0]} is not a known setting")
    return cls(**values)


def _to_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    raise TypeError(f"expected a dict or DictConfig for the l2t settings, got {type(config).__name__}")


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise L2TConfigError(f"{key} must be one of {list(allowed)}; got {value!r}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise L2TConfigError(f"{key} must be an integer >= 1; got {value!r}")
