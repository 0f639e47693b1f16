"""Evaluation of any checkpoint or HF model: pass@1 / maj@4, token use, accuracy under token budgets
(paper Fig. 3) and the episode-depth analysis (paper Fig. 1), with reports and run comparisons.

Python use::

    from l2t_verl.evaluation import AnalysisConfig, ForceConfig, SamplingConfig, compare, evaluate

    sampling = SamplingConfig(n=8, max_tokens=256)
    analysis = AnalysisConfig(
        budgets=[64, 128], depth=True, force=ForceConfig("\\n</think>\\nThe answer is \\\\boxed{", "}.")
    )
    grpo = evaluate("outputs/grpo/checkpoints", "data/test.parquet", backend="hf", sampling=sampling,
                    analysis=analysis, output_dir="eval/grpo")
    l2t = evaluate("outputs/l2t/checkpoints", ...)
    rows = compare({"grpo": grpo, "l2t": l2t}, "eval/compare")

CLIs: ``scripts/eval/evaluate.py`` and ``scripts/eval/compare.py``.
"""

from __future__ import annotations

from l2t_verl.evaluation.backends import (
    BACKENDS,
    Generation,
    GenerationBackend,
    HFBackend,
    SamplingConfig,
    VLLMBackend,
    make_backend,
)
from l2t_verl.evaluation.checkpoints import resolve_model
from l2t_verl.evaluation.data import Problem, load_problems
from l2t_verl.evaluation.depth import depth_by_tier, depth_curve, run_depth
from l2t_verl.evaluation.errors import EvaluationError
from l2t_verl.evaluation.forcing import ForceConfig, ForcedAnswerer
from l2t_verl.evaluation.metrics import budget_cut, maj_at_k, majority_score, pass_at_1, summarize
from l2t_verl.evaluation.pipeline import DEFAULT_SAMPLING, AnalysisConfig, evaluate
from l2t_verl.evaluation.report import compare, load_result, write_report
from l2t_verl.evaluation.result import EvalResult, SampleRecord

__all__ = [
    "BACKENDS",
    "DEFAULT_SAMPLING",
    "AnalysisConfig",
    "EvalResult",
    "EvaluationError",
    "ForceConfig",
    "ForcedAnswerer",
    "Generation",
    "GenerationBackend",
    "HFBackend",
    "Problem",
    "SampleRecord",
    "SamplingConfig",
    "VLLMBackend",
    "budget_cut",
    "compare",
    "depth_by_tier",
    "depth_curve",
    "evaluate",
    "load_problems",
    "load_result",
    "maj_at_k",
    "majority_score",
    "make_backend",
    "pass_at_1",
    "resolve_model",
    "run_depth",
    "summarize",
    "write_report",
]
