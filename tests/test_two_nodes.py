"""The cluster launch path, run for real: a two-node Ray cluster on this one machine.

``recipes/cluster/ray_cluster.sh`` starts a head and a second node, each advertising one device slot
(the CPU platform reports its slots as GPUs), with their own ports and session folders; the trainer
joins it from the head through ``RAY_ADDRESS`` with ``trainer.nnodes=2 trainer.n_gpus_per_node=1``.

Checked: the two data-parallel ranks run on different Ray nodes (from the cluster's actor table); the
first step (same weights everywhere) agrees with one node running 2 ranks; a run resumed on the two
nodes from the step-2 checkpoint reproduces step 3's penalties and advantages.

Printed, not asserted: step 2 against one node. Both runs see the same responses, but their step-2
penalties differ by about 10% (docs/reproduce.md, "Multi-node"). One optimizer step lies between; the
likely cause is that the ranks get the samples in another order, so the gradient sums differ in their
last bits, and Adam's first step (about ``lr * sign(g)`` per weight) turns those bits into another
update wherever a gradient is rounding noise.

Every process the test starts runs in its own session and is stopped by that session at the end, even
when the test fails (never ``ray stop``: it would stop every Ray process on the machine). Ray's token
authentication is off for this loopback cluster (``RAY_AUTH_MODE=disabled``); a real cluster keeps it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from l2t_verl import tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "cluster" / "ray_cluster.sh"
RTOL = 1e-4
HEAD_PORTS = ("RAY_PORT", "DASHBOARD_PORT", "RAY_CLIENT_SERVER_PORT")
NODE_PORTS = (
    "NODE_MANAGER_PORT",
    "OBJECT_MANAGER_PORT",
    "DASHBOARD_AGENT_LISTEN_PORT",
    "DASHBOARD_AGENT_GRPC_PORT",
    "RUNTIME_ENV_AGENT_PORT",
    "METRICS_EXPORT_PORT",
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",
        PYTHON=sys.executable,
        RAY=str(Path(sys.executable).parent / "ray"),
        NODE_IP="127.0.0.1",
        DASHBOARD_HOST="127.0.0.1",
        NUM_GPUS="1",
        NUM_CPUS="16",
        BLOCK="1",
        JOIN_TIMEOUT_S="60",
    )
    return env


def _stop_session(leader: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to every process of the session the leader started."""

    def members() -> list[int]:
        return [p for p in _pids() if _sid(p) == leader.pid]

    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)
    leader.wait(timeout=5)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _ray_query(address: str, code: str, env: dict[str, str], timeout_s: float = 120) -> object:
    """Run ``code`` (which sets ``result``) in a fresh driver connected to the cluster; its JSON."""
    script = (
        f"import json, ray\nray.init(address={address!r}, logging_level='ERROR')\n{code}\n"
        "print(json.dumps(result))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_nodes(tmp_path):
    env = _base_env()
    ports = _free_ports(len(HEAD_PORTS) + 2 * len(NODE_PORTS))
    # Short session folders: Ray's socket paths must fit AF_UNIX's 107 bytes.
    sessions = Path(tempfile.mkdtemp(prefix="l2t2n", dir="/tmp"))
    head_env = {**env, "TEMP_DIR": str(sessions / "h")}
    worker_env = {**env, "TEMP_DIR": str(sessions / "w")}
    for key in HEAD_PORTS:
        head_env[key] = str(ports.pop())
    for key in NODE_PORTS:
        head_env[key], worker_env[key] = str(ports.pop()), str(ports.pop())
    address = f"127.0.0.1:{head_env['RAY_PORT']}"
    started = []
    try:
        for name, node_env, args in (
            ("head", head_env, ["head"]),
            ("node2", worker_env, ["worker", address]),
        ):
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
            started.append(
                subprocess.Popen(
                    ["bash", str(SCRIPT), *args],
                    env=node_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        while True:
            for proc in started:
                if proc.poll() is not None:
                    pytest.fail(f"a Ray node exited with {proc.returncode}: see {tmp_path}/*.log")
            try:
                socket.create_connection(("127.0.0.1", int(head_env["RAY_PORT"])), timeout=2).close()
                alive = _ray_query(address, "result = sum(n['Alive'] for n in ray.nodes())", env, 30)
            except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
                alive = 0
            if alive == 2:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the two Ray nodes did not come up within 120 s: see {tmp_path}/*.log")
            time.sleep(2)
        yield address, env
    finally:
        for proc in reversed(started):
            _stop_session(proc)
        shutil.rmtree(sessions, ignore_errors=True)


def _train(assets: Path, out: Path, steps: int, env: dict[str, str], *overrides: str) -> list[dict]:
    cmd = tiny_run.command(
        assets,
        out,
        "l2t",
        steps,
        batch=4,
        n=2,
        data_seed=0,
        checkpoint_dir=out / "ckpt",
        overrides=[
            # 4 prompts x 2 samples over 2 ranks: 4 samples a rank.
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.full_determinism=true",
            f"l2t.dump_dir={out / 'dump'}",
            *overrides,
        ],
    )
    finished = tiny_run.run(cmd, out, cwd=out.parent, env=env, timeout_s=600, check=False)
    if finished.returncode != 0:
        pytest.fail(f"trainer exited with {finished.returncode}; log tail:\n{finished.log_tail(60)}")
    return finished.steps()


def _dump(out: Path, step: int) -> dict[str, dict]:
    """Per-sample records of one step, by sequence hash (identical responses share one entry)."""
    lines = (out / "dump" / f"step_{step}.jsonl").read_text().splitlines()
    return {r["sequence_sha1"]: r for r in map(json.loads, lines)}


def _worst_rel(a: dict[str, dict], b: dict[str, dict], fields: tuple[str, ...]) -> float:
    assert a.keys() == b.keys(), "the two runs sampled different responses"
    worst = 0.0
    for key in a:
        for field in fields:
            for x, y in zip(a[key][field], b[key][field], strict=True):
                # Relative, with a floor: an advantage of 0 in one run and 1e-9 in the other agrees.
                worst = max(worst, abs(x - y) / max(abs(y), 1e-6))
    return worst


def test_two_nodes_on_one_machine(two_nodes, e2e_assets, tmp_path):
    address, env = two_nodes
    start = time.monotonic()
    joined = {**env, "RAY_ADDRESS": address}
    nodes2 = tmp_path / "two_nodes"
    steps = _train(
        e2e_assets, nodes2, 3, joined, "trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.save_freq=2"
    )
    assert [s["step"] for s in steps] == [1, 2, 3]

    # The two data-parallel ranks (verl's fused actor/rollout workers) ran on the two different nodes.
    placement = _ray_query(
        address,
        "from ray.util.state import list_actors\n"
        "acts = list_actors(detail=True, limit=10000)\n"
        "result = {'workers': [a.node_id for a in acts if a.class_name.endswith('WorkerDict')],"
        " 'nodes': [n['NodeID'] for n in ray.nodes()]}",
        env,
    )
    assert len(placement["workers"]) == 2
    assert sorted(placement["workers"]) == sorted(placement["nodes"])

    # Resume on the two nodes from the step-2 checkpoint: step 3 as in the uninterrupted run.
    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(nodes2 / "ckpt" / "global_step_2", resumed / "ckpt" / "global_step_2")
    (resumed / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    after = _train(
        e2e_assets,
        resumed,
        3,
        joined,
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=1",
        "trainer.save_freq=-1",
    )
    assert [s["step"] for s in after] == [3]
    resume_err = _worst_rel(_dump(resumed, 3), _dump(nodes2, 3), ("penalty_raw", "advantages"))
    assert resume_err <= RTOL, resume_err

    # One node, two ranks, its own local Ray: the first step agrees (same weights, same responses).
    one_node = tmp_path / "one_node"
    _train(
        e2e_assets, one_node, 2, env, "trainer.nnodes=1", "trainer.n_gpus_per_node=2", "trainer.save_freq=-1"
    )
    step1_err = _worst_rel(_dump(one_node, 1), _dump(nodes2, 1), ("jr", "advantages"))
    assert step1_err <= RTOL, step1_err
    step2 = _dump(one_node, 2), _dump(nodes2, 2)
    shared = step2[0].keys() & step2[1].keys()
    step2_err = _worst_rel(
        {k: step2[0][k] for k in shared}, {k: step2[1][k] for k in shared}, ("penalty_raw",)
    )
    print(
        f"two nodes: wall {time.monotonic() - start:.0f} s; resume step-3 max rel diff {resume_err:.2e}; "
        f"vs one node: step 1 {step1_err:.2e}, step 2 penalties {step2_err:.2e} "
        f"({len(shared)} of {len(step2[1])} responses shared)"
    )
