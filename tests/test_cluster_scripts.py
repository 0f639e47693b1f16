"""recipes/cluster/slurm_example.sbatch without Slurm and without Ray.

The script expands SLURM_JOB_NODELIST itself (bash, no scontrol), so its host list is unit-tested here by
sourcing it, and its whole job is checked with DRY_RUN=1: the job steps it would start (the Ray head on the
first node, a worker on every other one) and the recipe it runs on the head, whose own dry run resolves
the config with the allocation's node count. A dry run is a bash script plus one Hydra compose (under a
second), so the module stays in `scripts/test.sh --fast`.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "recipes" / "cluster" / "slurm_example.sbatch"
DATA = "/nonexistent/data"


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """Only what the scripts need: a developer's shell may hold any recipe variable (NNODES, HOSTS, ...).
    An `scontrol` that fails first on PATH proves that nothing calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'scontrol was called' >&2\nexit 97\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    env.update({k: os.environ[k] for k in ("LANG", "LC_ALL", "TMPDIR") if k in os.environ})
    return env


def expand(nodelist: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = f'source "{SBATCH}"; expand_nodelist "$1"; printf "%s\\n" "${{hosts[@]}}"'
    return subprocess.run(
        ["bash", "-c", script, "_", nodelist], capture_output=True, text=True, env=env, timeout=30
    )


def dry_run(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    full = {**env, "DRY_RUN": "1", "DATA_DIR": DATA, "PYTHON": sys.executable, **extra}
    return subprocess.run(
        ["bash", str(SBATCH)], capture_output=True, text=True, env=full, cwd=ROOT, timeout=60
    )


# ------------------------------------------------------------------------------------- the host list


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("node[01-04]", ["node01", "node02", "node03", "node04"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("gpu[007]", ["gpu007"]),
        ("a,b", ["a", "b"]),
        ("gpu[1,3-4]", ["gpu1", "gpu3", "gpu4"]),
        ("a,gpu[1,3-4],node[08-10]", ["a", "gpu1", "gpu3", "gpu4", "node08", "node09", "node10"]),
        ("rack1-node[1-2]", ["rack1-node1", "rack1-node2"]),
        ("rack[1-2]-n[1-2].ib", ["rack1-n1.ib", "rack1-n2.ib", "rack2-n1.ib", "rack2-n2.ib"]),
        ("x_1,gpu[1-2]", ["x_1", "gpu1", "gpu2"]),
    ],
)
def test_nodelist_expands_as_scontrol_show_hostnames(environ, nodelist, hosts):
    proc = expand(nodelist, environ)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == hosts
    assert proc.stderr == ""


@pytest.mark.parametrize(
    "nodelist, reason",
    [
        ("", "empty host name"),
        ("a,,b", "empty host name"),
        ("a,", "empty host name"),
        ("gpu[1-2", "'[' without ']'"),
        ("gpu1-2]", "']' without '['"),
        ("gpu[[1]]", "nested '['"),
        ("gpu[]", "empty range"),
        ("gpu[1,]", "empty range"),
        ("gpu[4-3]", "decreasing range '4-3'"),
        ("gpu[a-b]", "bad range 'a-b'"),
        ("gpu[1-2-3]", "bad range '1-2-3'"),
        ("gpu 1", "bad host name 'gpu 1'"),
        ("gpu[1-999999]", "too large"),
    ],
)
def test_a_malformed_nodelist_is_a_one_line_error_naming_it(environ, nodelist, reason):
    proc = expand(nodelist, environ)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"SLURM_JOB_NODELIST='{nodelist}'" in proc.stderr and reason in proc.stderr


# ----------------------------------------------------------------------------------------- the job


def test_sbatch_directives_parse():
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!")
    # sbatch reads #SBATCH lines only until the first command
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives and all(lines.index(d) < first_command for d in directives)
    options = {}
    for directive in directives:
        match = re.fullmatch(r"#SBATCH --([a-z][a-z-]*)(?:=(\S+))?", directive)
        assert match, directive
        options[match[1]] = match[2]
    assert {"nodes", "gpus-per-node", "ntasks-per-node", "time"} <= set(options)
    assert int(options["nodes"]) >= 1 and int(options["gpus-per-node"]) >= 1
    assert re.fullmatch(r"\d+:\d\d:\d\d", options["time"])


def check_job(proc: subprocess.CompletedProcess, hosts: list[str], port: int, gpus: int) -> dict:
    """The printed job: Ray's head on hosts[0], one worker per other host joining it, the recipe on the
    head with NNODES = len(hosts). Returns the recipe's resolved config."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scontrol" not in proc.stderr
    head, address = hosts[0], f"{hosts[0]}:{port}"
    # the steps start in the background, so they may print in any order
    steps = [line for line in proc.stderr.splitlines() if line.startswith("[dry-run] srun ")]
    step_host = {step: re.search(r" -w (\S+) ", step)[1] for step in steps}
    heads = [step for step in steps if step.endswith("ray_cluster.sh head")]
    workers = [step for step in steps if step.endswith(f"ray_cluster.sh worker {address}")]
    assert len(heads) == 1 and step_host[heads[0]] == head, steps
    assert sorted(step_host[step] for step in workers) == sorted(hosts[1:]), steps
    assert len(steps) == len(hosts), steps
    for step in steps:
        assert f" NUM_GPUS={gpus} RAY_PORT={port} " in step, step
    launches = [line for line in proc.stderr.splitlines() if line.startswith("[dry-run] on ")]
    assert launches == [
        f"[dry-run] on {head}: NNODES={len(hosts)} GPUS_PER_NODE={gpus} RAY_ADDRESS={address} "
        "bash recipes/run.sh deepscaler_1.5b l2t"
    ]
    config = yaml.safe_load(proc.stdout)
    assert (config["trainer"]["nnodes"], config["trainer"]["n_gpus_per_node"]) == (len(hosts), gpus)
    return config


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("node[01-02]", ["node01", "node02"]),
        ("gpu[1,3-4],x", ["gpu1", "gpu3", "gpu4", "x"]),
    ],
)
def test_sbatch_starts_ray_over_the_allocation_and_the_recipe_on_its_head(environ, nodelist, hosts):
    proc = dry_run(
        environ,
        SLURM_JOB_NODELIST=nodelist,
        SLURM_GPUS_ON_NODE="4",  # what Slurm sets for --gpus-per-node=4
        RAY_PORT="6380",
        RECIPE="recipes/run.sh deepscaler_1.5b l2t",
    )
    config = check_job(proc, hosts, port=6380, gpus=4)
    assert config["algorithm"]["adv_estimator"] == "l2t"
    assert config["trainer"]["project_name"] == "l2t_deepscaler_1.5b"


def test_sbatch_outside_slurm_takes_hosts(environ):
    proc = dry_run(
        environ, HOSTS="gpu01 gpu02 gpu03", GPUS_PER_NODE="2", RECIPE="recipes/run.sh deepscaler_1.5b l2t"
    )
    check_job(proc, ["gpu01", "gpu02", "gpu03"], port=6379, gpus=2)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"SLURM_JOB_NODELIST": "gpu[1-2"}, "cannot expand SLURM_JOB_NODELIST='gpu[1-2'"),
        ({}, "no nodes"),
    ],
)
def test_sbatch_without_a_usable_host_list_stops_before_any_step(environ, extra, message):
    proc = dry_run(environ, **extra)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_ray_cluster_takes_addresses_and_ports_from_variables_and_prints_the_join_command():
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "NODE_IP": "127.0.0.1",
        "DASHBOARD_HOST": "127.0.0.1",
        "RAY_PORT": "7001",
        "DASHBOARD_PORT": "7002",
        "TEMP_DIR": "/tmp/r",
        "NODE_MANAGER_PORT": "7003",
        "NUM_GPUS": "1",
        "NUM_CPUS": "4",
    }
    script = str(ROOT / "recipes" / "cluster" / "ray_cluster.sh")
    head = subprocess.run(["bash", script, "head"], env=env, capture_output=True, text=True, check=True)
    for option in (
        "--port=7001",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=7002",
        "--temp-dir=/tmp/r",
        "--node-ip-address=127.0.0.1",
        "--node-manager-port=7003",
        "--num-gpus=1",
    ):
        assert option in head.stdout.split(), option
    assert "worker 127.0.0.1:7001" in head.stderr  # the join command for the other nodes
    worker = subprocess.run(
        ["bash", script, "worker", "127.0.0.1"], env=env, capture_output=True, text=True, check=True
    )
    assert "--address=127.0.0.1:7001" in worker.stdout.split()


def test_ray_cluster_worker_gives_up_on_an_unreachable_head_with_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JOIN_TIMEOUT_S": "1", "NUM_GPUS": "1", "PYTHON": sys.executable}
    script = str(ROOT / "recipes" / "cluster" / "ray_cluster.sh")
    run = subprocess.run(
        ["bash", script, "worker", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"ray_cluster.sh: head 127.0.0.1:{port} unreachable within 1s (JOIN_TIMEOUT_S)"
    ]
