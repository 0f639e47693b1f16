"""Fault injection for the robustness tests: inert unless the environment variable ``L2T_FAULTS`` is set.

Spec 8 promises a counted fallback, never a lost step, when a J_r probe fails or a penalty comes
out non-finite. Those faults are rare in a healthy run, so the tests provoke them inside a real
training run::

    L2T_FAULTS="probe=0.25,penalty_nan=0.5" python -m l2t_verl.main ...

makes about a quarter of the probe requests raise and half of the penalty rows NaN. Which ones
is a pure function of the site and a key (request id and probe number, call and sample row), so
the share is exact in expectation and independent of timing. Ray workers started by the driver
inherit its environment, which is how the setting reaches the rollout and actor workers.
"""

from __future__ import annotations

import hashlib
import os

import torch

ENV_VAR = "L2T_FAULTS"
SITES = ("probe", "penalty_nan")


class InjectedFault(RuntimeError):
    """Raised where a fault was injected, so logs tell it from a real failure."""


def rates(spec: str | None = None) -> dict[str, float]:
    """Parse ``"site=rate,..."`` (default: the environment); a typo is an error, not a silent no-op."""
    spec = os.environ.get(ENV_VAR, "") if spec is None else spec
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        site, sep, value = item.partition("=")
        if not sep or site not in SITES:
            raise ValueError(f"{ENV_VAR}: bad entry {item!r}; expected site=rate with site in {SITES}")
        rate = float(value)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{ENV_VAR}: rate of {site!r} must be in [0, 1], got {rate}")
        out[site] = rate
    return out


def hit(site: str, key: str) -> bool:
    """Whether the fault ``site`` fires for ``key`` (deterministic in both)."""
    rate = rates().get(site, 0.0)
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(f"{site}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def poison(values: torch.Tensor, site: str, keys: list[str]) -> torch.Tensor:
    """``values`` with the rows whose key hits ``site`` set to NaN (a copy only when one does)."""
    rows = [i for i, key in enumerate(keys) if hit(site, key)]
    if not rows:
        return values
    values = values.clone()
    values[rows] = float("nan")
    return values
