"""The parameter compression penalty of L2T (docs/method.md §3).

The production path, in the order a training step runs it:

- :mod:`~l2t_verl.penalty.proxy`: the proxy set P (a regex over parameter names) and
  :class:`LowRankUpdate`, the rank-r SVD proxy ``dW_r`` of P's update;
- :mod:`~l2t_verl.penalty.fisher`: :func:`episode_penalties`, ``p_k = <dW_r, g_k>^2 + lambda ||dW_r||^2``
  for every episode of a batch, by token-budget micro-batches (:mod:`~l2t_verl.penalty.batch`);
- :mod:`~l2t_verl.penalty.directional`: the per-token directional derivatives in one pass
  (``forward_ad``, ``reverse``, ``jvp``), reading the log-probs through
  :mod:`~l2t_verl.penalty.output_layer` in chunks of positions.

:mod:`~l2t_verl.penalty.reference` holds what tests and odd models use: the literal eq. 4 form with
explicit Fisher matrices, and central finite differences.
"""

from l2t_verl.penalty.batch import token_budget_groups
from l2t_verl.penalty.fisher import auto_method, episode_penalties
from l2t_verl.penalty.output_layer import DEFAULT_LOGIT_CHUNK, chunked_token_logprobs
from l2t_verl.penalty.proxy import (
    DEFAULT_DAMPING,
    EXACT_SVD_MAX_NUMEL,
    LowRankUpdate,
    decoder_layer_indices,
    last_layer_mlp_regex,
    proxy_regex,
    random_layer_regex,
    select_proxy_params,
)
from l2t_verl.penalty.reference import (
    episode_penalties_by_gradients,
    episode_penalties_exact,
    full_vocab_logprobs,
)

__all__ = [
    "DEFAULT_DAMPING",
    "DEFAULT_LOGIT_CHUNK",
    "EXACT_SVD_MAX_NUMEL",
    "LowRankUpdate",
    "auto_method",
    "chunked_token_logprobs",
    "decoder_layer_indices",
    "episode_penalties",
    "episode_penalties_by_gradients",
    "episode_penalties_exact",
    "full_vocab_logprobs",
    "last_layer_mlp_regex",
    "proxy_regex",
    "random_layer_regex",
    "select_proxy_params",
    "token_budget_groups",
]
