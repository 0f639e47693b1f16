"""The fault-injection switch used by the robustness tests must be inert by default, exact in its
rates, and loud about typos (a misspelled site silently injecting nothing would void those tests)."""

from __future__ import annotations

import pytest
import torch

from l2t_verl import faults


def test_inert_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert faults.rates() == {}
    assert not any(faults.hit("probe", str(i)) for i in range(1000))
    values = torch.ones(4, 3)
    assert faults.poison(values, "penalty_nan", list("abcd")) is values


def test_rates_are_honoured_and_deterministic(monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "probe=0.25, penalty_nan=1")
    hits = [faults.hit("probe", f"req:{i}") for i in range(4000)]
    assert 0.22 < sum(hits) / len(hits) < 0.28
    assert hits == [faults.hit("probe", f"req:{i}") for i in range(4000)]
    poisoned = faults.poison(torch.ones(3, 2), "penalty_nan", ["a", "b", "c"])
    assert torch.isnan(poisoned).all()


@pytest.mark.parametrize("spec", ["probes=0.1", "probe", "probe=1.5", "penalty_nan=-0.1"])
def test_bad_specs_are_errors(spec):
    with pytest.raises(ValueError, match=faults.ENV_VAR):
        faults.rates(spec)
