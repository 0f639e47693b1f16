"""Per-token directional derivatives ``d/de log pi(z_t | z_<t; W + e dW_r)`` at ``e = 0`` (docs/method.md §3).

``<dW_r, g_k>`` of the compression penalty is the sum of these over episode k's tokens. Each method
gets all of them for a whole micro-batch from one pass, whatever the number of episodes:

- ``forward_ad``: forward hooks add the tangent ``x dW_r^T = (x V^T) U^T`` to each proxy layer's
  output as a forward-mode dual number; the model's weights are only read (works on FSDP2 shards).
- ``jvp``: ``torch.func.jvp`` over ``functional_call`` with tangent ``dW_r`` on P.
- ``reverse``: one backward of the summed log-likelihood from the output layer to the proxy layers'
  outputs gives each token's output gradient ``gy_t``; then
  ``<dW_r, grad log p_t> = sum over W in P of (gy_t^T U_W) . (V_W x_t)``. Exact only when no op after
  P mixes positions (the default proxy, the last layer's MLP: after it come the per-position norm,
  output layer and log-softmax), which is checked while the forward runs. Needs no forward-mode
  rule anywhere, so any attention kernel works.

All three read the log-probs through :mod:`l2t_verl.penalty.output_layer`. The central finite difference
(two forwards) is in :mod:`l2t_verl.penalty.reference`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2t_verl.penalty.batch import TokenBatch
from l2t_verl.penalty.output_layer import (
    chunked_logprob_grads,
    run_forward,
    scored_in_output_layer,
    token_logprobs,
)
from l2t_verl.penalty.proxy import LowRankUpdate, last_layer_mlp_regex, select_proxy_params

__all__ = [
    "FAST_METHODS",
    "fast_directional_derivatives",
    "in_last_layer_mlp",
    "linear_owners",
    "lowrank_contraction",
]

FAST_METHODS = ("forward_ad", "reverse", "jvp")


_FORWARD_AD_ATTENTION = ("eager", "sdpa")


def lowrank_contraction(gy_u: Tensor, v_x: Tensor) -> Tensor:
    """One matrix's share of ``<dW_r, grad log p_t>`` per token: ``(gy_t^T U) . (V x_t)`` summed over the
    rank, from ``gy_u = gy U`` and ``v_x = x V^T`` ``[..., r]`` (``dW_r = U V``, so
    ``gy^T dW_r x = (gy^T U)(V x)``: no ``m x n`` matrix is formed). Used by every reverse-mode backend;
    a sharded engine reduces ``gy_u`` / ``v_x`` over its tensor-parallel group first."""
    return (gy_u * v_x).sum(-1)


def in_last_layer_mlp(model: nn.Module, update: LowRankUpdate) -> bool:
    """True when every proxy matrix belongs to the last decoder layer's MLP: after it come only
    per-position ops (norm, output layer, log-softmax), so no tangent or gradient crosses attention."""
    try:
        last_mlp = select_proxy_params(model, last_layer_mlp_regex(model))
    except ValueError:
        return False
    return set(update.names) <= set(last_mlp)


@contextmanager
def _forward_ad_attention(model: nn.Module, update: LowRankUpdate) -> Iterator[None]:
    """Attention with forward-mode rules for this pass, when a tangent can reach attention (a proxy
    before some attention layer, e.g. ``random_layers``): flash_attention_2's autograd function has
    none, so a model configured with it runs sdpa with the math kernel instead, and the config is put
    back. The math kernel holds ``[heads, T, T]`` scores and their tangent per layer, which bounds T
    for such proxies (docs/method.md §3). The default proxy keeps the model's own attention."""
    if in_last_layer_mlp(model, update):
        yield
        return
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    changed = []
    for config in configs.values():
        current = getattr(config, "_attn_implementation", None)
        if isinstance(current, str) and current not in _FORWARD_AD_ATTENTION:
            changed.append((config, current))
            config._attn_implementation = "sdpa"
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for config, current in changed:
            config._attn_implementation = current


def linear_owners(model: nn.Module, update: LowRankUpdate, method: str) -> dict[str, nn.Linear]:
    owners = {}
    for name in update.names:
        prefix, _, leaf = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        if leaf != "weight" or not isinstance(owner, nn.Linear):
            raise ValueError(
                f"method={method!r} needs proxy weights of nn.Linear modules; {name!r} is not one"
            )
        owners[name] = owner
    return owners


def _forward_ad(model: nn.Module, update: LowRankUpdate, batch: TokenBatch, chunk: int) -> Tensor:
    owners = linear_owners(model, update, "forward_ad")

    def make_hook(u: Tensor, v: Tensor):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = fwad.unpack_dual(args[0]).primal
            primal, tangent = fwad.unpack_dual(output)
            added = (x @ v.to(x.dtype).T) @ u.to(x.dtype).T
            return fwad.make_dual(primal, added if tangent is None else tangent + added)

        return hook

    with ExitStack() as stack, fwad.dual_level():
        for name, owner in owners.items():
            u, v = update.factors[name]
            device = owner.weight.device if owner.weight.device.type != "meta" else u.device
            stack.callback(owner.register_forward_hook(make_hook(u.to(device), v.to(device))).remove)
        stack.enter_context(_forward_ad_attention(model, update))
        try:
            derivative = fwad.unpack_dual(token_logprobs(model, batch, chunk)).tangent
        except (NotImplementedError, RuntimeError) as err:
            _raise_if_no_forward_rule(err)
            raise
    if derivative is None:  # no proxy layer took part in the forward
        return torch.zeros(int(batch.valid.sum()), device=batch.input_ids.device)
    return derivative


def _jvp(model: nn.Module, update: LowRankUpdate, batch: TokenBatch, chunk: int) -> Tensor:
    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in update.names}
    # jvp needs tangents in the primal dtype; only P gets a tangent, so the rest of the model stays a
    # constant and the one forward carries d/de of every token at once.
    tangents = {n: update.dense(n).to(device=p.device, dtype=p.dtype) for n, p in primals.items()}

    def logprobs_of(proxy: dict[str, Tensor]) -> Tensor:
        return token_logprobs(model, batch, chunk, proxy)

    try:
        with _forward_ad_attention(model, update):
            _, derivative = jvp(logprobs_of, (primals,), (tangents,))
    except (NotImplementedError, RuntimeError) as err:
        _raise_if_no_forward_rule(err)
        raise
    return derivative


def _raise_if_no_forward_rule(err: Exception) -> None:
    # NotImplementedError: an op without a forward-AD rule; RuntimeError: an old-style
    # autograd.Function (forward(ctx, ...), like flash_attn's), which functorch transforms refuse.
    if isinstance(err, NotImplementedError) or "functorch transforms" in str(err):
        raise RuntimeError(
            f"forward-mode AD is not supported by an op of this model: {err}. Use method='reverse' (when "
            "only per-position ops follow the proxy set) or method='finite_difference'."
        ) from err


class _ReverseTap:
    """Forward hooks for the reverse method: each proxy layer keeps ``V x_t`` of the episode positions
    and exposes its output ``y`` to autograd; attention modules report when they run after a proxy."""

    def __init__(self, model: nn.Module, update: LowRankUpdate, batch: TokenBatch) -> None:
        self.update = update
        self.batch = batch
        self.owners = linear_owners(model, update, "reverse")
        self.name_of = {id(owner): name for name, owner in self.owners.items()}
        self.projected: dict[str, Tensor] = {}  # name -> [N, r] V x_t
        self.outputs: dict[str, Tensor] = {}  # name -> [B, T, m] proxy output in the graph
        self.attention = {
            id(m): n for n, m in model.named_modules() if "attention" in type(m).__name__.lower()
        }
        self.open: list[tuple[str, list[str]]] = []  # attention modules running, with the linears run inside
        self.handles: list = []
        for owner in self.owners.values():
            self.handles.append(owner.register_forward_pre_hook(self._proxy_pre))
            self.handles.append(owner.register_forward_hook(self._proxy_post))
        for m in model.modules():
            if id(m) in self.attention:
                self.handles.append(m.register_forward_pre_hook(self._attention_pre))
                self.handles.append(m.register_forward_hook(self._attention_post))
            elif isinstance(m, nn.Linear) and id(m) not in self.name_of:
                self.handles.append(m.register_forward_hook(self._linear_post))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _proxy_pre(self, module: nn.Module, args: tuple) -> None:
        # Record the graph from the first proxy on: the layers before P stay graph-free, so the
        # backward costs (and its saved activations weigh) only what runs after P.
        torch.set_grad_enabled(True)

    def _proxy_post(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        name = self.name_of[id(module)]
        if name in self.outputs:
            raise ValueError(f"method='reverse': proxy layer {name!r} ran twice in one forward")
        for _, inside in self.open:
            inside.append(name)
        _, v = self.update.factors[name]
        with torch.no_grad():
            rows = args[0][:, :-1][self.batch.valid]
            self.projected[name] = rows.to(v.dtype) @ v.to(rows.device).T
        y = output if output.requires_grad else output.detach().requires_grad_(True)
        self.outputs[name] = y
        return y

    def _attention_pre(self, module: nn.Module, args: tuple) -> None:
        if self.outputs:
            self._refuse(self.attention[id(module)], next(iter(self.outputs)))
        self.open.append((self.attention[id(module)], []))

    def _linear_post(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        for _, inside in self.open:
            inside.append("")

    def _attention_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        name, inside = self.open.pop()
        # Inside an attention module only its output projection (the last linear it runs) comes
        # after the position mixing; any proxy run earlier in it feeds the attention scores.
        for i, ran in enumerate(inside):
            if ran and i != len(inside) - 1:
                self._refuse(name, ran)

    @staticmethod
    def _refuse(attention: str, proxy: str) -> None:
        raise ValueError(
            f"method='reverse' needs only per-position ops after the proxy set, but attention module "
            f"{attention!r} mixes positions after proxy {proxy!r}; use method='forward_ad' for this proxy"
        )


@contextmanager
def _gathered_for_backward(model: nn.Module, proxy_names: Iterable[str]) -> Iterator[None]:
    """Under FSDP2, the weights the backward reads (the units holding P, and the root's own: the final
    norm) are gathered again for it, then freed.

    FSDP2 frees a unit's gathered weights after its forward and gathers them again from a hook on the
    unit's output when a backward reaches it. The backward here starts inside the model, at the
    output layer's input, so it never passes the root's output and its hook; without this, it would
    read the root's freed weights (a crash on CPU, garbage on a GPU). ``unshard`` refills the same
    storage the autograd graph saved. Collective: every rank gathers the same units in the same order.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        yield
        return
    # Every FSDP unit that contains a proxy layer: its own unit (a decoder layer) and the root, i.e.
    # the units whose name prefixes a proxy parameter's name.
    names = list(proxy_names)
    units = [
        m
        for prefix, m in model.named_modules()
        if isinstance(m, FSDPModule) and any(not prefix or n.startswith(prefix + ".") for n in names)
    ]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _reverse(model: nn.Module, update: LowRankUpdate, batch: TokenBatch, chunk: int) -> Tensor:
    targets = batch.targets
    captured: dict[str, Tensor] = {}

    def score(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        captured["hidden"] = hidden
        with torch.no_grad():
            rows = hidden[:, :-1][batch.valid].detach()
            captured["grad"] = chunked_logprob_grads(rows, weight.detach(), bias, targets, chunk)

    tap = _ReverseTap(model, update, batch)
    try:
        with scored_in_output_layer(model, batch, chunk, score):
            run_forward(model, batch)
    finally:
        tap.remove()
    n = int(batch.valid.sum())
    names = [name for name in update.names if name in tap.outputs]
    hidden = captured["hidden"]
    if not names or not hidden.requires_grad:  # P took no part in the forward
        return torch.zeros(n, device=batch.input_ids.device)
    grad_hidden = torch.zeros_like(hidden)
    grad_hidden[:, :-1][batch.valid] = captured["grad"].to(hidden.dtype)
    outputs = [tap.outputs[name] for name in names]
    with _gathered_for_backward(model, tap.owners):
        grads = torch.autograd.grad(hidden, outputs, grad_outputs=grad_hidden, allow_unused=True)
    total = None
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            continue
        u, _ = update.factors[name]
        gy = grad[:, :-1][batch.valid]
        term = lowrank_contraction(gy.to(u.dtype) @ u.to(gy.device), tap.projected[name])
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(n, device=batch.input_ids.device)


def fast_directional_derivatives(
    model: nn.Module, update: LowRankUpdate, batch: TokenBatch, method: str, *, logit_chunk: int
) -> Tensor:
    """``d/de log pi(z_t | z_<t; W + e dW_r)`` at ``e = 0`` for the batch's N episode tokens, ``[N]``.

    Runs under ``torch.no_grad`` (the reverse method records a graph only from P on, for its one
    backward); the caller puts the model in eval mode."""
    if logit_chunk < 1:
        raise ValueError(f"logit_chunk must be >= 1, got {logit_chunk}")
    with torch.no_grad():
        if method == "forward_ad":
            return _forward_ad(model, update, batch, logit_chunk)
        if method == "jvp":
            return _jvp(model, update, batch, logit_chunk)
        if method == "reverse":
            return _reverse(model, update, batch, logit_chunk)
    raise ValueError(f"unknown fast penalty method {method!r}; expected one of {FAST_METHODS}")
