"""Warm start for the tiny offline model: a short supervised fine-tune on worked arithmetic traces.

A randomly initialised model never writes a ``\\boxed{}`` answer, so every GRPO/L2T reward is 0 and
the group-normalised advantages vanish.  1200 SFT steps on the reference traces of
:func:`l2t_verl.arith_task.worked_solution` (60-90 s on two CPU cores) teach the trace format and
enough arithmetic to solve some problems, which gives RL the mixed 0/1 rewards it learns from.

Tuning notes (hidden 128, 2 layers, batch 16, default data): the format and the copying of
operands from the prompt are learnt within a few hundred steps; the arithmetic comes late and
abruptly (the first step's result is right ~45% of the time after 900 steps, ~80% after 1200).
The learning rate matters most: at 5e-3 the model is still worse after 2400 steps than at 1e-3
after 1200.

Traces can carry *redundant* episodes (re-checks and restatements that do not move the computation
forward, see :func:`sft_traces`), so the warm-started policy over-thinks a little and L2T has
something to prune.

Why a plain PyTorch loop rather than ``verl.trainer.sft_trainer``: verl's SFT trainer expects to be
launched by ``torchrun`` (it calls ``initialize_global_process_group``, which reads ``RANK`` /
``LOCAL_RANK`` / ``WORLD_SIZE``), is configured through Hydra, reads parquet through
``MultiTurnSFTDataset``, trains through the FSDP ``TrainingWorker`` engine and saves sharded
checkpoints that need a merge step to become a ``from_pretrained`` directory.  With the ``cpu``
platform that chain might be made to run, but it costs a subprocess, process-group start-up and a
checkpoint round trip for a one-minute job on a 0.4M-parameter model; a ~100-line loop is faster,
deterministic and callable in-process from :func:`l2t_verl.assets.build_all`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from l2t_verl.arith_task import (
    DATA_SOURCE,
    OP_SYMBOL,
    STEP_SEPARATOR,
    THINK_END,
    THINK_START,
    parse_problem,
    problem_text,
    solution_steps,
    solve,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "REDUNDANT_KINDS",
    "chat_prompt_ids",
    "evaluate",
    "evaluate_greedy",
    "is_necessary_step",
    "sft_traces",
    "warm_start",
]

# Redundant-episode kinds; each is correct but adds nothing to the computation.
REDUNDANT_KINDS = ("check", "so_far", "reread")
_REREAD = "Let me re-read the question."

# (prompt ids, response ids)
_Example = tuple[list[int], list[int]]


def is_necessary_step(episode: str) -> bool:
    """True for a bare step equation such as ``"12 * 3 = 36"``, what
    :func:`l2t_verl.arith_task.worked_solution` writes for each step."""
    parts = episode.split(" ")
    return (
        len(parts) == 5
        and parts[0].isdigit()
        and parts[1] in OP_SYMBOL.values()
        and parts[2].isdigit()
        and parts[3] == "="
        and parts[4].isdigit()
    )


def _redundant_episode(
    rng: random.Random, done: int, start: int, equations: list[str], values: list[int]
) -> str:
    """A redundant episode placed after ``done`` necessary steps; it only restates known facts."""
    kinds = list(REDUNDANT_KINDS) if done else ["so_far", "reread"]
    kind = rng.choice(kinds)
    if kind == "check":
        return f"Check: {equations[rng.randrange(done)]}"
    if kind == "so_far":
        return f"So far we have {values[done - 1] if done else start}."
    return _REREAD


def sft_traces(
    problems: Sequence[Any], seed: int, redundant_max: int = 2, redundant_per_gap: int = 0
) -> list[str]:
    """Worked solutions with redundant episodes inserted among the steps.

    Each trace is :func:`l2t_verl.arith_task.worked_solution` with extra ``"\\n\\n"``-separated episodes
    inside the think block: ``"Check: <an earlier step>"``, ``"So far we have <current value>."``
    or ``"Let me re-read the question."``. They never reorder the necessary steps and are always
    true, so the boxed answer is still correct. ``problems`` accepts anything :func:`parse_problem` does.

    - ``redundant_per_gap = 0``: ``0..redundant_max`` redundant episodes per trace, at uniformly
      random gaps (before the first step up to after the last);
    - ``redundant_per_gap = m > 0``: every gap gets ``0..m`` of them, so redundancy grows with the
      number of steps (an over-thinker that re-checks as it goes) and ``redundant_max`` is unused.
      The count is random per gap, so the policy learns them as optional: RL can then learn to
      drop them.
    """
    if redundant_max < 0 or redundant_per_gap < 0:
        raise ValueError(
            f"redundant_max and redundant_per_gap must be >= 0, got {redundant_max}, {redundant_per_gap}"
        )
    # A str seed is hashed stably across processes (see arith_task.make_problems).
    rng = random.Random(f"{DATA_SOURCE}:sft_traces:{seed}")
    traces = []
    for problem in problems:
        start, equations, values = solution_steps(problem)
        if redundant_per_gap:
            gaps = [g for g in range(len(equations) + 1) for _ in range(rng.randint(0, redundant_per_gap))]
        else:
            n_extra = rng.randint(0, redundant_max)
            gaps = sorted(rng.randint(0, len(equations)) for _ in range(n_extra))
        episodes: list[str] = []
        pending = iter(gaps)
        gap = next(pending, None)
        for done in range(len(equations) + 1):
            while gap == done:
                episodes.append(_redundant_episode(rng, done, start, equations, values))
                gap = next(pending, None)
            if done < len(equations):
                episodes.append(equations[done])
        answer = values[-1] if values else start
        traces.append(
            f"{THINK_START}\n{STEP_SEPARATOR.join(episodes)}\n{THINK_END}\nThe answer is \\boxed{{{answer}}}."
        )
    return traces


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: Any) -> list[int]:
    """Token ids of ``problem``'s user message under the chat template, generation prompt included."""
    # The exact prompt verl's RLHFDataset feeds the rollout, so SFT and RL see the same context.
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem_text(problem)}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


def _collate(examples: Sequence[_Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)``; labels are -100 outside the response."""
    import torch

    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
    return input_ids, labels


def _batch_loss(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    # No attention mask: with right padding, causal attention already keeps real tokens from
    # seeing pads, and skipping the mask lets SDPA take its faster is_causal path.
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    # Project only the positions that predict a response token: the LM head over the prompt
    # would be a sizeable share of the compute of such a small model, for nothing.
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    # Token-mean over the batch's response tokens, so long traces are not down-weighted.
    return F.cross_entropy(logits.float(), targets[keep])


def _batches(examples: list[_Example], batch_size: int, rng: random.Random) -> list[list[_Example]]:
    """Full batches of similar length (less padding) in random order; ragged tails are dropped so
    every step has the same batch size.  ``examples`` must already be shuffled."""
    window = batch_size * 8
    batches = []
    for lo in range(0, len(examples), window):
        chunk = sorted(examples[lo : lo + window], key=lambda e: len(e[0]) + len(e[1]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Any],
    steps: int = 1200,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    redundant_max: int = 1,
    *,
    redundant_per_gap: int = 0,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    log_every: int = 0,
) -> dict[str, Any]:
    """Supervised fine-tune ``model`` in place on chat-formatted ``(problem, sft trace)`` pairs.

    Each example is the prompt ``apply_chat_template(user message, add_generation_prompt=True)``
    followed by ``trace + <|im_end|>``; the loss is the token-mean cross-entropy on the response
    tokens only.  AdamW with linear warm-up then cosine decay to 10% of ``lr``, gradient norm
    clipped to 1.0.  Problems are visited in a seed-fixed shuffled order, epoch after epoch, with
    fresh redundant episodes each epoch (:func:`sft_traces` with a per-epoch seed).  The torch RNG
    is seeded inside ``fork_rng``, so the run is deterministic and leaves the caller's RNG alone.

    Every step takes a full batch (similar lengths grouped, ragged tails dropped), so ``problems``
    must hold at least ``batch_size`` items; pass ``steps * batch_size`` distinct problems for a
    single pass without repeats.  ``log_every > 0`` logs the loss (``logging``, INFO) that often.

    Returns ``{"initial_loss", "final_loss", "seconds", "steps", "examples", "losses"}``; the
    initial/final losses are averages over the first/last ``min(10, steps)`` steps (single
    steps are noisy), ``losses`` is the per-step list.  The model is left in eval mode.
    """
    import torch

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1 or len(problems) < batch_size:
        raise ValueError(f"need 1 <= batch_size <= len(problems), got {batch_size} and {len(problems)}")
    started = time.perf_counter()
    losses: list[float] = []
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    prompts = [chat_prompt_ids(tokenizer, p) for p in problems]
    order_rng = random.Random(f"{DATA_SOURCE}:sft_order:{seed}")

    def epoch_batches(epoch: int) -> list[list[_Example]]:
        # Fresh redundant episodes every epoch: the model should learn where they may go, not
        # memorise one placement per problem.
        traces = sft_traces(
            problems,
            seed=seed * 100_003 + epoch,
            redundant_max=redundant_max,
            redundant_per_gap=redundant_per_gap,
        )
        order = list(range(len(problems)))
        order_rng.shuffle(order)
        # One batched call: the fast tokenizer encodes in Rust, ~30% quicker than a Python loop.
        encoded = tokenizer(traces, add_special_tokens=False)["input_ids"]
        responses = [list(ids) + [eos_id] for ids in encoded]
        examples = [(prompts[i], responses[i]) for i in order]
        return _batches(examples, batch_size, order_rng)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        # No weight decay on norms and biases, the usual transformer recipe.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.98),
        )

        def lr_factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        model.train()
        epoch, pending = 0, iter(epoch_batches(0))
        for step in range(steps):
            batch = next(pending, None)
            if batch is None:
                epoch += 1
                pending = iter(epoch_batches(epoch))
                batch = next(pending)
            loss = _batch_loss(model, *_collate(batch, pad_id))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                logger.info("warm start: step %d/%d, loss %.4f", step + 1, steps, losses[-1])
        model.eval()

    window = min(10, len(losses))
    return {
        "initial_loss": sum(losses[:window]) / window if window else float("nan"),
        "final_loss": sum(losses[-window:]) / window if window else float("nan"),
        "seconds": time.perf_counter() - started,
        "steps": steps,
        "examples": steps * batch_size,
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _ground_truth(problem: Any) -> str:
    if isinstance(problem, dict) and "reward_model" in problem:
        return str(problem["reward_model"]["ground_truth"])
    return str(solve(problem))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Any],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Batched generation (left padding) scored with ``compute_score("l2t_arith", ...)``.

    ``temperature=0`` is greedy; otherwise plain sampling (``top_k=0``, ``top_p=1``, as verl's
    rollout does by default), seeded inside ``fork_rng``.  Returns ``accuracy``, ``mean_tokens``
    (generated tokens incl. the EOS), ``boxed_rate`` (responses with a closed ``\\boxed{}``),
    ``accuracy_by_steps`` (keyed by the number of operations), ``mean_episodes`` (``"\\n\\n"``-
    separated pieces of the think block) and the decoded ``responses``.
    """
    import torch

    from l2t_verl.scoring import compute_score, extract_boxed

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    responses: list[str] = []
    lengths: list[int] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for lo in range(0, len(problems), batch_size):
            chunk = [chat_prompt_ids(tokenizer, p) for p in problems[lo : lo + batch_size]]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p) :] = torch.tensor(p)
                attention[i, width - len(p) :] = 1
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                **sampling,
            )[:, width:]
            for row in out.tolist():
                n = row.index(eos_id) + 1 if eos_id in row else len(row)
                lengths.append(n)
                responses.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    if was_training:
        model.train()

    truths = [_ground_truth(p) for p in problems]
    scores = [compute_score(DATA_SOURCE, r, t) for r, t in zip(responses, truths, strict=True)]
    by_steps: dict[int, list[float]] = {}
    for p, s in zip(problems, scores, strict=True):
        by_steps.setdefault(len(parse_problem(p)[1]), []).append(s)
    episodes = [r.split(THINK_END)[0].count(STEP_SEPARATOR) + 1 for r in responses]
    n = max(1, len(problems))
    return {
        "accuracy": sum(scores) / n,
        "mean_tokens": sum(lengths) / n,
        "boxed_rate": sum(extract_boxed(r) is not None for r in responses) / n,
        "accuracy_by_steps": {k: sum(v) / len(v) for k, v in sorted(by_steps.items())},
        "mean_episodes": sum(episodes) / n,
        "responses": responses,
    }


def evaluate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Any],
    max_new_tokens: int,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Greedy :func:`evaluate`: ``accuracy`` and ``mean_tokens`` plus the extras listed there."""
    return evaluate(model, tokenizer, problems, max_new_tokens, temperature=0.0, batch_size=batch_size)
