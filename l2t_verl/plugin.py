"""verl plugin entry point (``[project.entry-points."verl.plugins"]``).

verl imports this module at ``import verl`` in the driver and in every Ray worker. It registers, through
verl's own registries, everything l2t-verl adds:

- the ``cpu`` platform (and, only when it is the active platform, the CPU compatibility shims);
- the ``hf`` rollout backend (``actor_rollout_ref.rollout.name=hf``);
- the L2T components (reward manager, agent loop, trainer, length-penalty baseline).

verl swallows exceptions raised by plugins (it logs them at debug level), so failures here are logged
as errors: a silently missing registration would surface much later as a confusing lookup error.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("l2t_verl")

_L2T_MODULES = (
    "l2t_verl.agent_loop",
    "l2t_verl.length_penalty",
    "l2t_verl.reward_manager",
    "l2t_verl.trainer",
)


def _register_rollout() -> None:
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    # verl keeps its rollout adapters in this module-level table and offers no register() for it.
    base._ROLLOUT_REGISTRY[("hf", "async")] = "l2t_verl.local.rollout.HFServerAdapter"

    def load_hf_replica():
        from l2t_verl.local.hf_server import HFReplica

        return HFReplica

    RolloutReplicaRegistry.register("hf", load_hf_replica)


def register() -> None:
    from l2t_verl.local import platform

    if platform.cpu_platform_active():
        from l2t_verl.local.compat import apply_cpu_patches

        apply_cpu_patches()
    _register_rollout()
    for name in _L2T_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


try:
    register()
except Exception:
    logger.exception("l2t-verl failed to register its verl plugins")
    raise
