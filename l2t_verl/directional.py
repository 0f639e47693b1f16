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
- ``finite_difference``: central difference of two forwards at ``W -+ h dW_r / ||dW_r||``.

All four read the log-probs through :func:`chunked_token_logprobs` from inside the output layer's
forward: only the episode positions are scored, ``logit_chunk`` positions at a time, so neither the
``[T, V]`` logits nor their tangent is ever held whole (the output layer itself computes logits for
one position only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2t_verl.proxy import LowRankUpdate, compute_dtype, last_layer_mlp_regex, select_proxy_params

__all__ = [
    "DEFAULT_LOGIT_CHUNK",
    "TokenBatch",
    "chunked_token_logprobs",
    "directional_derivatives",
    "in_last_layer_mlp",
]

DEFAULT_LOGIT_CHUNK = 1024
"""Positions per chunk of the output layer's log-softmax: ``chunk x V`` fp32 values (600 MB at
V = 152k) per live buffer instead of ``T x V``."""

_FORWARD_AD_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class TokenBatch:
    """A padded micro-batch and where its episode tokens are."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    kwargs: dict[str, Any]  # extra forward kwargs (position_ids, use_cache, ...)
    valid: Tensor  # [B, T-1] bool: logits position t-1 predicts an episode token t
    slot: Tensor  # [N] flat index b * K + k of every valid token, in ``valid`` order
    exists: Tensor  # [B, K] bool: sample b has episode k
    num_episodes: int

    @property
    def targets(self) -> Tensor:
        """The N episode tokens, in ``valid`` order."""
        return self.input_ids[:, 1:][self.valid]


# --------------------------------------------------------------------------------------------------
# The output layer, in chunks


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    targets: Tensor,
    chunk: int = DEFAULT_LOGIT_CHUNK,
) -> Tensor:
    """``log_softmax(hidden @ weight^T + bias)[n, targets[n]]`` for the rows of ``hidden`` ``[N, H]``
    (``weight=None``: the rows are logits already).

    ``chunk`` rows at a time, reduced in fp32 (fp64 for fp64): the same numbers as the unchunked
    formula with ``chunk x V`` values alive instead of ``N x V``. Plain torch ops, so forward-mode
    tangents (dual numbers, ``torch.func.jvp``) flow through it chunk by chunk as well.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start : start + chunk]
        logits = (rows if weight is None else F.linear(rows, weight, bias)).to(dtype)
        picked = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        parts.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=dtype)


def _chunked_logprob_grads(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int
) -> Tensor:
    """``d log p_n / d hidden_n = (onehot(z_n) - softmax_n) @ weight`` per row ``[N, H]``, chunked."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], weight, bias).to(dtype)
        residual = -torch.softmax(logits, dim=-1)
        residual.scatter_add_(-1, targets[start : start + chunk, None], residual.new_ones(logits.shape[0], 1))
        parts.append((residual.to(weight.dtype) @ weight).to(dtype))
    return torch.cat(parts) if parts else hidden.new_zeros(0, weight.shape[1], dtype=dtype)


def _output_layer(model: nn.Module) -> nn.Linear | None:
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if isinstance(layer, nn.Linear) else None


@contextmanager
def _scored_in_output_layer(
    model: nn.Module, batch: TokenBatch, chunk: int, score: Callable[[Tensor, Tensor, Tensor | None], Any]
) -> Iterator[list]:
    """While active, the model's output layer calls ``score(hidden_rows, weight, bias)`` on the episode
    positions' hidden states (appending the result to the yielded list) and then computes logits for
    the last position only.

    The hook runs inside the output layer's own forward, after any pre-forward hook of the engine
    (FSDP2 gathers the layer's weight there), so the full weight is what ``score`` sees.
    """
    layer = _output_layer(model)
    if layer is None:
        raise ValueError("the model has no nn.Linear output layer (get_output_embeddings())")
    results: list = []

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        results.append(score(hidden, module.weight, module.bias))
        return (hidden[:, -1:], *args[1:])

    handle = layer.register_forward_pre_hook(pre_hook)
    try:
        yield results
    finally:
        handle.remove()


def _forward(model: nn.Module, batch: TokenBatch, params: Mapping[str, Tensor] | None = None) -> None:
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
    if params is None:
        model(**kwargs)
    else:
        functional_call(model, dict(params), args=(), kwargs=kwargs)


def _token_logprobs(
    model: nn.Module, batch: TokenBatch, chunk: int, params: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``log pi(z_t | z_<t)`` of the N episode tokens ``[N]`` (carrying any tangent of the forward)."""
    targets = batch.targets
    if _output_layer(model) is None:
        # Not a causal LM with a linear output layer: score its logits, still in chunks of positions.
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
        out = model(**kwargs) if params is None else functional_call(model, dict(params), (), kwargs)
        rows = (out.logits if hasattr(out, "logits") else out)[:, :-1][batch.valid]
        return chunked_token_logprobs(rows, None, None, targets, chunk)

    def score(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return chunked_token_logprobs(hidden[:, :-1][batch.valid], weight, bias, targets, chunk)

    with _scored_in_output_layer(model, batch, chunk, score) as results:
        _forward(model, batch, params)
    if len(results) != 1:
        raise RuntimeError(f"the output layer ran {len(results)} times in one forward; expected once")
    return results[0]


# --------------------------------------------------------------------------------------------------
# Forward mode


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


def _linear_owners(model: nn.Module, update: LowRankUpdate, method: str) -> dict[str, nn.Linear]:
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
    owners = _linear_owners(model, update, "forward_ad")

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
            derivative = fwad.unpack_dual(_token_logprobs(model, batch, chunk)).tangent
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

    def token_logprobs(proxy: dict[str, Tensor]) -> Tensor:
        return _token_logprobs(model, batch, chunk, proxy)

    try:
        with _forward_ad_attention(model, update):
            _, derivative = jvp(token_logprobs, (primals,), (tangents,))
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


# --------------------------------------------------------------------------------------------------
# Reverse mode


class _ReverseTap:
    """Forward hooks for the reverse method: each proxy layer keeps ``V x_t`` of the episode positions
    and exposes its output ``y`` to autograd; attention modules report when they run after a proxy."""

    def __init__(self, model: nn.Module, update: LowRankUpdate, batch: TokenBatch) -> None:
        self.update = update
        self.batch = batch
        self.owners = _linear_owners(model, update, "reverse")
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
def _gathered_for_backward(model: nn.Module, owners: Iterable[nn.Module]) -> Iterator[None]:
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
    # Every FSDP unit that contains a proxy layer: its own unit (a decoder layer) and the root.
    owners = list(owners)
    units = [
        m
        for m in model.modules()
        if isinstance(m, FSDPModule) and any(sub is owner for sub in m.modules() for owner in owners)
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
            captured["grad"] = _chunked_logprob_grads(rows, weight.detach(), bias, targets, chunk)

    tap = _ReverseTap(model, update, batch)
    try:
        with _scored_in_output_layer(model, batch, chunk, score):
            _forward(model, batch)
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
    with _gathered_for_backward(model, tap.owners.values()):
        grads = torch.autograd.grad(hidden, outputs, grad_outputs=grad_hidden, allow_unused=True)
    total = None
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            continue
        u, _ = update.factors[name]
        gy = grad[:, :-1][batch.valid]
        term = ((gy.to(u.dtype) @ u.to(gy.device)) * tap.projected[name]).sum(-1)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(n, device=batch.input_ids.device)


# --------------------------------------------------------------------------------------------------
# Finite difference


@contextmanager
def _upcast_modules(modules: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Run ``modules`` in ``dtype``: cast their floating inputs up and their outputs back, so the
    perturbed fp32 proxy weights meet fp32 activations inside, and the rest of the model sees its
    own dtype."""

    def cast(obj: Any, to: torch.dtype) -> Any:
        if isinstance(obj, Tensor) and obj.is_floating_point():
            return obj.to(to)
        if isinstance(obj, tuple):
            return tuple(cast(o, to) for o in obj)
        if isinstance(obj, list):
            return [cast(o, to) for o in obj]
        return obj

    handles = []
    try:
        for module in modules:
            out_dtypes: list[torch.dtype] = []

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict, _out: list = out_dtypes) -> tuple:
                first = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
                _out.append(first.dtype if first is not None else dtype)
                return cast(args, dtype), {k: cast(v, dtype) for k, v in kwargs.items()}

            def post_hook(mod: nn.Module, args: tuple, output: Any, _out: list = out_dtypes) -> Any:
                return cast(output, _out.pop())

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _finite_difference(
    model: nn.Module, update: LowRankUpdate, batch: TokenBatch, chunk: int, eps: float | None
) -> Tensor:
    params = dict(model.named_parameters())
    model_dtype = params[update.names[0]].dtype
    if eps is None:
        # Central differences balance O(h^2) truncation against rounding/h: h ~ cbrt(machine eps)
        # of the precision the logits are computed in (fp32: 5e-3, bf16: 0.2, fp64: 6e-6).
        eps = torch.finfo(model_dtype).eps ** (1.0 / 3.0)
    norm = update.sq_norm().sqrt()
    owners: dict[int, nn.Module] = {}
    for name in update.names:
        prefix, _, _ = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        owners[id(owner)] = owner
    # The P modules run in fp32 (fp64 for fp64 weights): in bf16, W + eps * dW_r would round to W.
    compute = compute_dtype(model_dtype)
    upcast = [m for m in owners.values() if any(p.dtype != compute for p in m.parameters(recurse=False))]
    prefix_of = {id(m): n for n, m in model.named_modules()}
    base: dict[str, Tensor] = {}
    for module in upcast:
        prefix = prefix_of[id(module)]
        for pname, p in module.named_parameters(recurse=False):
            base[f"{prefix}.{pname}" if prefix else pname] = p.detach().to(compute)

    # Step h along the unit direction dW_r / ||dW_r||, with h relative to the size of the proxy
    # weights (textbook h = eps * characteristic |x|): an update of lr ~ 1e-6 is far too small a
    # step for fp32 logits, and a fixed absolute h would depend on the model's weight scale.
    weight_norm = torch.sqrt(sum(params[n].detach().to(compute).square().sum() for n in update.names))
    step = eps * max(float(weight_norm), 1.0)
    results = []
    for sign in (1.0, -1.0):
        scale = (sign * step / norm).to(compute)
        overrides = dict(base)
        for name in update.names:
            weight = params[name].detach().to(compute)
            overrides[name] = weight + scale * update.dense(name).to(weight.device, compute)
        with _upcast_modules(upcast, compute):
            results.append(_token_logprobs(model, batch, chunk, overrides))
    plus, minus = results
    # d/de f(W + e dW_r) = ||dW_r|| * d/ds f(W + s dW_r / ||dW_r||)
    return (plus - minus) * (norm.to(plus.dtype) / (2.0 * step))


def directional_derivatives(
    model: nn.Module,
    update: LowRankUpdate,
    batch: TokenBatch,
    method: str,
    *,
    logit_chunk: int = DEFAULT_LOGIT_CHUNK,
    eps: float | None = None,
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
        if method == "finite_difference":
            return _finite_difference(model, update, batch, logit_chunk, eps)
    raise ValueError(
        f"unknown penalty method {method!r}; expected 'forward_ad', 'reverse', 'jvp' or 'finite_difference'"
    )
