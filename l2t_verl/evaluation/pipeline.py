"""``evaluate``: sample n responses per problem, score them, then optionally measure accuracy under
token budgets and along episode depth. The pieces live in their own modules (backends, checkpoints,
metrics, depth, report); this module only wires them together."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from l2t_verl.episodes import EpisodeConfig
from l2t_verl.evaluation.backends import GenerationBackend, SamplingConfig, make_backend
from l2t_verl.evaluation.checkpoints import resolve_model
from l2t_verl.evaluation.data import Problem, load_problems, split_paths
from l2t_verl.evaluation.depth import check_depth_settings, depth_by_tier, run_depth
from l2t_verl.evaluation.errors import EvaluationError
from l2t_verl.evaluation.forcing import ForceConfig, ForcedAnswerer, reasoning_end
from l2t_verl.evaluation.metrics import check_budgets, run_budgets, summarize
from l2t_verl.evaluation.result import EvalResult, SampleRecord, Trace
from l2t_verl.scoring import extract_boxed

__all__ = ["DEFAULT_SAMPLING", "AnalysisConfig", "default_run_name", "evaluate", "prompt_ids"]

logger = logging.getLogger(__name__)

# Several samples per problem because pass@1 is their mean and maj@k needs k of them; 4096 tokens
# leave room for long reasoning.
DEFAULT_SAMPLING = SamplingConfig(n=20, max_tokens=4096)


@dataclass(frozen=True)
class AnalysisConfig:
    """The forced-answer analyses run on the sampled responses, and how an answer is forced.

    budgets: token budgets for accuracy-under-budget (:mod:`l2t_verl.evaluation.metrics`), each <= the
        sampling ``max_tokens``; none by default.
    depth: run the episode-depth analysis (:mod:`l2t_verl.evaluation.depth`) on the first
        ``depth_samples`` samples of each problem (all when None), segmenting with ``episodes``.
    force: forced answering (:mod:`l2t_verl.evaluation.forcing`); for the arith task use
        ``ForceConfig("\\n</think>\\nThe answer is \\\\boxed{", "}.")``.
    """

    budgets: Sequence[int] = ()
    depth: bool = False
    depth_samples: int | None = None
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    force: ForceConfig = field(default_factory=ForceConfig)

    def validate(self, max_tokens: int) -> AnalysisConfig:
        """A copy with the budgets sorted and de-duplicated; :class:`EvaluationError` for a bad setting."""
        budgets = tuple(check_budgets(self.budgets, max_tokens))
        self.force.validate()
        if self.depth:
            check_depth_settings(self.episodes, self.depth_samples)
        return replace(self, budgets=budgets)


def prompt_ids(tokenizer: Any, problem: Problem, chat_template: bool = True) -> list[int]:
    """Token ids of a problem's prompt, as verl's RLHFDataset builds them (chat template + generation
    prompt). ``chat_template=False`` joins the message contents instead, for base models without one."""
    if not chat_template:
        return [int(t) for t in tokenizer.encode("\n".join(m["content"] for m in problem.messages))]
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluationError(
            f"{problem.dataset}: row {problem.row}: the tokenizer has no chat template "
            "(pass chat_template=False to prompt with the raw message text)"
        )
    ids = tokenizer.apply_chat_template(
        problem.messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding despite return_dict=False
        ids = ids["input_ids"]
    return [int(t) for t in ids]


# Path parts that say where a model sits in a verl checkpoint rather than which run it is.
_GENERIC_PARTS = {"huggingface", "huggingface_merged", "actor", "checkpoints", "model"}


def default_run_name(model: str | Path, model_dir: str | Path) -> str:
    """A readable run name: the first non-generic part of the model path, plus the checkpoint step
    when there is one, e.g. ``outputs/l2t/checkpoints`` -> ``l2t@global_step_6``."""
    parts = Path(str(model)).parts
    step = next((p for p in reversed(Path(str(model_dir)).parts) if p.startswith("global_step_")), None)
    base = [p for p in parts if p not in _GENERIC_PARTS and not p.startswith("global_step_")]
    name = base[-1] if base else str(model)
    return f"{name}@{step}" if step else name


def _record(problem: Problem, sample: int, ids: list[int], finish: str, tokenizer: Any) -> SampleRecord:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    score, error = problem.score(text)
    return SampleRecord(
        dataset=problem.dataset,
        row=problem.row,
        sample=sample,
        tier=problem.tier,
        data_source=problem.data_source,
        ground_truth=problem.ground_truth,
        response=text,
        num_tokens=len(ids),
        finish_reason=finish,
        reasoning_tokens=reasoning_end(ids, tokenizer),
        score=score,
        answer=extract_boxed(text),
        verifier_error=error,
    )


def evaluate(
    model: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    backend: str | GenerationBackend = "hf",
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    analysis: AnalysisConfig | None = None,
    limit: int | None = None,
    maj_k: int = 4,
    chat_template: bool = True,
    merge_dir: str | Path | None = None,
    backend_options: dict[str, Any] | None = None,
    name: str | None = None,
    output_dir: str | Path | None = None,
) -> EvalResult:
    """Evaluate a model on one or more verl-schema datasets.

    model: HF model dir, verl checkpoint dir (root, ``global_step_N`` or its ``actor/``; FSDP shards
        are merged into ``merge_dir``) or ``hf:ORG/NAME``; see :func:`resolve_model`. Only a label when
        ``backend`` is a ready :class:`GenerationBackend`.
    data: a dataset file, a comma-separated list of them, or a sequence of paths.
    backend: ``"hf"`` (in-process, CPU), ``"vllm"`` (GPU) or a backend instance to reuse (not closed).
    sampling: how the ``sampling.n`` responses per problem are sampled.
    analysis: the budget and depth analyses and how they force answers (:class:`AnalysisConfig`);
        ``None`` runs neither.
    limit: evaluate only the first ``limit`` rows of each file.
    output_dir: also write the report (JSON, CSV, plots) there.

    Bad input raises :class:`EvaluationError` with a one-line message naming it; settings, dataset
    rows (missing file, row without ground truth, unknown data_source), the backend name and budgets
    (> max_tokens) are checked before any model is loaded.
    """
    started = time.perf_counter()
    sampling = sampling.validate()
    analysis = (analysis or AnalysisConfig()).validate(sampling.max_tokens)
    if maj_k < 1:
        raise EvaluationError(f"maj_k must be >= 1; got {maj_k}")
    problems = load_problems(data, limit=limit)

    owned = isinstance(backend, str)
    if isinstance(backend, str):
        if backend not in ("hf", "vllm"):
            raise EvaluationError(f"unknown backend {backend!r}; choose one of hf, vllm")
        model_dir = resolve_model(model, merge_dir=merge_dir)
        options = dict(backend_options or {})
        if backend == "vllm":
            options.setdefault("seed", sampling.seed)
        engine = make_backend(backend, model_dir, **options)
    else:
        model_dir = str(model)
        engine = backend
    timing: dict[str, float] = {}
    try:
        tok = engine.tokenizer
        prompts = [prompt_ids(tok, p, chat_template) for p in problems]
        for p, ids in zip(problems, prompts, strict=True):
            if engine.max_model_len is not None and len(ids) + 1 > engine.max_model_len:
                raise EvaluationError(
                    f"{p.dataset}: row {p.row}: prompt of {len(ids)} tokens does not fit the model's "
                    f"context of {engine.max_model_len} tokens"
                )
        t0 = time.perf_counter()
        generations = engine.generate(prompts, sampling, desc=f"sampling n={sampling.n}")
        timing["generate_s"] = time.perf_counter() - t0
        traces = [
            Trace(p, ids, list(g.token_ids), _record(p, j, list(g.token_ids), g.finish_reason, tok))
            for p, ids, gens in zip(problems, prompts, generations, strict=True)
            for j, g in enumerate(gens)
        ]
        answerer = ForcedAnswerer(engine, analysis.force)
        if analysis.budgets:
            t0 = time.perf_counter()
            run_budgets(traces, analysis.budgets, answerer)
            timing["budgets_s"] = time.perf_counter() - t0
        if analysis.depth:
            t0 = time.perf_counter()
            run_depth(traces, answerer, analysis.episodes, analysis.depth_samples)
            timing["depth_s"] = time.perf_counter() - t0
    finally:
        if owned:
            engine.close()
    records = [t.record for t in traces]
    datasets = list(dict.fromkeys(r.dataset for r in records))
    tiers = sorted(
        {r.tier for r in records}, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t)
    )
    timing["total_s"] = time.perf_counter() - started
    result = EvalResult(
        name=name or default_run_name(model, model_dir),
        model=str(model),
        model_dir=str(model_dir),
        config={
            "data": [str(p) for p in split_paths(data)],
            "backend": engine.name,
            "sampling": asdict(sampling),
            "budgets": list(analysis.budgets),
            "depth": analysis.depth,
            "depth_samples": analysis.depth_samples,
            "episodes": asdict(analysis.episodes),
            "force": asdict(analysis.force),
            "maj_k": maj_k,
            "limit": limit,
            "chat_template": chat_template,
        },
        overall={**summarize(records, maj_k), "probe_overflows": answerer.overflows},
        by_dataset={d: summarize([r for r in records if r.dataset == d], maj_k) for d in datasets},
        by_tier={t: summarize([r for r in records if r.tier == t], maj_k) for t in tiers},
        depth=depth_by_tier(records) if analysis.depth else {},
        timing=timing,
        samples=records,
    )
    if output_dir is not None:
        from l2t_verl.evaluation.report import write_report

        write_report(result, output_dir)
    return result
