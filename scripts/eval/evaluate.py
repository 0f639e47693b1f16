#!/usr/bin/env python
"""Evaluate a checkpoint or HF model: pass@1 / maj@4, tokens, accuracy under budgets, episode depth.

    python scripts/eval/evaluate.py --model PATH --data FILE[,FILE] --backend hf|vllm --n 20 \\
        --budgets 512,1024,2048 --depth --output DIR [--task arith]

PATH is a HF model dir, a verl checkpoint dir (trainer output dir, global_step_N or its actor/) or
hf:ORG/NAME. ``--task NAME`` takes the force/answer suffixes from l2t_verl/config/task/NAME.yaml;
``--force-suffix`` / ``--answer-suffix`` are used verbatim (no escape processing, so pass real
newlines, e.g. with bash's $'...'). Writes result.json, samples.jsonl, CSVs and PNGs to DIR.
A thin wrapper over :func:`l2t_verl.evaluation.evaluate`; bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout without install

from l2t_verl.episodes import EPISODE_MODES, EpisodeConfig  # noqa: E402
from l2t_verl.evaluation import (  # noqa: E402
    DEFAULT_SAMPLING,
    AnalysisConfig,
    EvaluationError,
    ForceConfig,
    SamplingConfig,
    evaluate,
)

TASK_DIR = Path(__file__).resolve().parents[2] / "l2t_verl" / "config" / "task"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def task_suffixes(task: str) -> dict[str, str]:
    """``force_suffix`` / ``answer_suffix`` of a task config (``l2t.progress.*`` in its YAML)."""
    import yaml

    path = TASK_DIR / f"{task}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
        raise EvaluationError(f"--task: unknown task {task!r} (known: {', '.join(known)})")
    progress = ((yaml.safe_load(path.read_text()) or {}).get("l2t") or {}).get("progress") or {}
    return {k: progress[k] for k in ("force_suffix", "answer_suffix") if k in progress}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model dir, verl checkpoint dir or hf:ORG/NAME")
    p.add_argument("--data", required=True, help="dataset file(s), comma separated (.parquet/.jsonl/.json)")
    p.add_argument("--backend", default="hf", help="hf (in-process, CPU) or vllm (GPU)")
    p.add_argument("--output", required=True, help="directory for the report")
    p.add_argument("--name", help="run name in reports (default: the model path's last part)")
    p.add_argument("--n", type=int, default=DEFAULT_SAMPLING.n, help="samples per problem")
    p.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature)
    p.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p)
    p.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_SAMPLING.max_tokens, help="max response tokens")
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLING.seed)
    p.add_argument("--limit", type=int, help="only the first LIMIT rows of each file")
    p.add_argument("--budgets", type=_ints, default=[], help="token budgets, e.g. 512,1024,2048")
    p.add_argument("--depth", action="store_true", help="run the episode-depth analysis (Acc(k), T(k))")
    p.add_argument("--depth-samples", type=int, help="samples per problem probed for depth (default all)")
    p.add_argument("--episode-mode", choices=EPISODE_MODES, default=EpisodeConfig.mode)
    p.add_argument("--episode-delimiter", default=EpisodeConfig.delimiter, help="regex (delimiter mode)")
    p.add_argument("--max-episodes", type=int, default=EpisodeConfig.max_episodes)
    p.add_argument("--min-episode-tokens", type=int, default=EpisodeConfig.min_episode_tokens)
    p.add_argument("--task", help="take force/answer suffixes from l2t_verl/config/task/TASK.yaml")
    p.add_argument("--force-suffix", help="text that closes the reasoning and opens the answer")
    p.add_argument("--answer-suffix", help="text that ends an answer")
    p.add_argument(
        "--answer-tokens", type=int, default=ForceConfig.answer_tokens, help="max tokens of a forced answer"
    )
    p.add_argument("--maj-k", type=int, default=4)
    p.add_argument("--no-chat-template", action="store_true", help="prompt with the raw message text")
    p.add_argument("--merge-dir", help="where FSDP shards are merged (default: <actor>/huggingface_merged)")
    p.add_argument("--batch-size", type=int, default=64, help="hf backend: sequences per batch")
    p.add_argument("--threads", type=int, help="hf backend: torch threads (1 suits tiny models)")
    p.add_argument("--max-model-len", type=int, help="cap on prompt + response tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm backend")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    try:
        suffixes = task_suffixes(args.task) if args.task else {}
        if args.force_suffix is not None:
            suffixes["force_suffix"] = args.force_suffix
        if args.answer_suffix is not None:
            suffixes["answer_suffix"] = args.answer_suffix
        sampling = SamplingConfig(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        analysis = AnalysisConfig(
            budgets=args.budgets,
            depth=args.depth,
            depth_samples=args.depth_samples,
            episodes=EpisodeConfig(
                mode=args.episode_mode,
                delimiter=args.episode_delimiter,
                min_episode_tokens=args.min_episode_tokens,
                max_episodes=args.max_episodes,
            ),
            force=ForceConfig(**suffixes, answer_tokens=args.answer_tokens),
        )
        options: dict = {"max_model_len": args.max_model_len}
        if args.backend == "hf":
            options.update(batch_size=args.batch_size, num_threads=args.threads)
        elif args.backend == "vllm":
            options.update(
                tensor_parallel_size=args.tensor_parallel_size,
                gpu_memory_utilization=args.gpu_memory_utilization,
            )
        result = evaluate(
            args.model,
            args.data,
            backend=args.backend,
            sampling=sampling,
            analysis=analysis,
            limit=args.limit,
            maj_k=args.maj_k,
            chat_template=not args.no_chat_template,
            merge_dir=args.merge_dir,
            backend_options=options,
            name=args.name,
            output_dir=args.output,
        )
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    o = result.overall
    maj = o.get(f"maj@{args.maj_k}")
    print(
        f"{result.name}: pass@1={o['pass@1']:.4f} maj@{args.maj_k}={'n/a' if maj is None else f'{maj:.4f}'} "
        f"mean_tokens={o['mean_tokens']:.1f} ({o['problems']} problems x {args.n} samples)"
    )
    for point in o.get("budgets") or []:
        print(f"  budget {point['budget']}: accuracy={point['accuracy']:.4f}")
    print(f"report: {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
