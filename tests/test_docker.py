"""Static checks of docker/Dockerfile (there is no Docker engine on the test machines)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_README = REPO / "docker" / "README.md"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def of(kind: str) -> list[str]:
    return [args for keyword, args in instructions() if keyword == kind]


def base_image() -> tuple[str, str]:
    froms = of("FROM")
    assert len(froms) == 1, f"expected a single-stage build, got FROM {froms}"
    image = froms[0].split()[0]
    assert "$" not in image, "the base image must be written out, not taken from a build arg"
    assert "@" not in image or ":" in image.split("@")[0]
    name, _, tag = image.partition(":")
    return name, tag


def test_base_image_is_a_pinned_verl_vllm_tag() -> None:
    name, tag = base_image()
    assert name == "verlai/verl"
    assert tag, "untagged FROM means latest"
    assert "latest" not in tag.lower()
    assert re.fullmatch(r"vllm\d{3}\.dev\d+", tag), tag
    # The same tag is what the docs tell people they get.
    assert f"{name}:{tag}" in DOCKER_README.read_text()


def test_base_image_matches_the_pinned_verl() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    verl_pin = [d for d in pyproject["project"]["dependencies"] if d.replace(" ", "").startswith("verl==")]
    assert verl_pin == ["verl==0.9.1"]
    # verl 0.9.1 declares the vLLM it is built for in its `vllm` extra; the tag encodes the same version.
    requires = importlib.metadata.requires("verl") or []
    vllm_pins = [r for r in requires if re.match(r"vllm\s*==", r) and 'extra == "vllm"' in r]
    assert len(vllm_pins) == 1, vllm_pins
    version = re.search(r"==\s*([\d.]+)", vllm_pins[0]).group(1)
    major, minor = version.split(".")[:2]
    _name, tag = base_image()
    assert tag.startswith(f"vllm{major}{int(minor):02d}."), (tag, version)


def test_gpu_extra_pins_verls_vllm_stack() -> None:
    """`.[gpu]` is the stack verl 0.9.1 declares in its `vllm` extra (the image's), plus flash-attn."""
    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    ours = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in extra}
    verls = {}
    for line in importlib.metadata.requires("verl") or []:
        requirement = Requirement(line)
        if (
            requirement.marker
            and requirement.marker.evaluate({"extra": "vllm"})
            and requirement.name != "verl"
        ):
            verls[requirement.name.lower()] = str(requirement.specifier)
    assert verls["torch"] == "==2.11.0" and verls["vllm"] == "==0.24.0", verls
    assert {k: ours.get(k) for k in verls} == verls
    assert ours["flash-attn"] == "==2.8.3"  # what the base image carries (Dockerfile header)
    assert "flash-attn 2.8.3" in DOCKERFILE.read_text()


def _commands(run_args: str) -> list[list[str]]:
    """Shell commands of a RUN, split at ``;``, ``&&``, ``||`` and ``|`` outside quotes."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=";&|>")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|>"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c and c[0] != "set"]


def test_package_installed_with_gpu_extra_keeping_torch() -> None:
    pip_installs = []
    for run in of("RUN"):
        for cmd in _commands(run):
            if cmd[:2] in (["pip", "install"], ["pip3", "install"]) or cmd[:4] == [
                "python",
                "-m",
                "pip",
                "install",
            ]:
                pip_installs.append(cmd)
    assert pip_installs, "no pip install"
    targets = [arg for cmd in pip_installs for arg in cmd if not arg.startswith("-")]
    assert ".[gpu]" in targets
    for arg in targets:
        assert not re.match(r"(torch|torchvision|torchaudio|vllm|flash[-_]attn)\b", arg), f"reinstalls {arg}"
    # The CUDA stack is frozen through a constraints file built from the installed versions ...
    install = next(cmd for cmd in pip_installs if ".[gpu]" in cmd)
    assert "--constraint" in install or "-c" in install
    run_text = " ".join(of("RUN"))
    assert re.search(r"pip freeze \| grep .*torch", run_text)
    # ... and the build checks that torch did not change.
    assert "torch_before" in run_text and '= "$torch_before"' in run_text


def test_entry_point_is_the_trainer() -> None:
    entrypoints = of("ENTRYPOINT")
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["python", "-m", "l2t_verl.main"]
    assert (REPO / "l2t_verl" / "main.py").is_file()


def _ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def test_copied_files_exist_and_are_not_ignored() -> None:
    patterns = _ignore_patterns()
    copied = []
    for args in of("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources = words[:-1]
        assert sources, args
        for source in sources:
            relative = source.rstrip("/")
            assert not Path(relative).is_absolute() and ".." not in Path(relative).parts
            assert (REPO / relative).exists(), f"COPY source {source} is not in the repository"
            assert not _ignored(relative, patterns), f"COPY source {source} is excluded by .dockerignore"
            copied.append(relative)
    # What `pip install .` needs: the project file, the readme it names, and the package; and the
    # recipes, which are how a run is launched.
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    for needed in ("pyproject.toml", readme, "l2t_verl", "recipes"):
        assert needed in copied, f"{needed} is not copied into the image"


def _image_path(relative: str) -> str:
    """Where a COPY of ``relative`` (a folder, copied to the same name) lands in the image."""
    workdir = "/"
    for keyword, args in instructions():
        if keyword == "WORKDIR":
            workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
        if keyword == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if relative in {w.rstrip("/") for w in words[:-1]}:
                destination = words[-1].rstrip("/")
                base = destination if destination.startswith("/") else f"{workdir.rstrip('/')}/{destination}"
                return base
    raise AssertionError(f"{relative} is not copied")


def test_recipes_are_in_the_image() -> None:
    recipes = _image_path("recipes")
    assert recipes == "/opt/l2t-verl/recipes", recipes
    # recipes/run.sh reads the settings from the l2t_verl/ beside it: /opt/l2t-verl/l2t_verl/config
    assert _image_path("l2t_verl") == "/opt/l2t-verl/l2t_verl"
    scripts = sorted((REPO / "recipes").glob("*/run_*.sh"))
    settings = sorted((REPO / "l2t_verl" / "config" / "recipe").glob("*.yaml"))
    assert scripts and settings and (REPO / "recipes" / "run.sh").is_file()
    patterns = _ignore_patterns()
    for path in [*scripts, *settings, REPO / "recipes" / "run.sh"]:
        assert not _ignored(str(path.relative_to(REPO)), patterns), path


@pytest.mark.parametrize("path", [".venv", ".git", "assets", "outputs", "tests", "l2t_verl/__pycache__"])
def test_dockerignore_keeps_local_artefacts_out(path: str) -> None:
    assert _ignored(path, _ignore_patterns())


def test_readme_shows_build_push_and_cluster_runs() -> None:
    text = DOCKER_README.read_text()
    for needed in (
        "docker build -f docker/Dockerfile",
        "docker push",
        "--gpus all",
        "--shm-size",
        "--address=",
        "trainer.nnodes",
        "python -m l2t_verl.main",
    ):
        assert needed in text, needed
    assert re.search(r"--entrypoint ray \S+ start --head", text)


def _joined_lines(lines: list[str]) -> list[str]:
    """Shell lines with ``\\`` continuations joined."""
    out, pending = [], ""
    for line in lines:
        stripped = line.strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((pending + stripped).strip())
        pending = ""
    return out


def _header_commands() -> list[str]:
    """Shell commands shown in the Dockerfile's leading comment."""
    header = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#"))
    return [c for c in _joined_lines(header) if c.startswith(("docker ", "DRY_RUN"))]


def _readme_commands(path: Path) -> list[str]:
    """Shell commands in the bash blocks of a markdown file."""
    commands, block = [], None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if block is not None:
                commands += [c for c in _joined_lines(block) if c and not c.startswith("#")]
                block = None
            elif line.strip() == "```bash":
                block = []
            continue
        if block is not None:
            block.append(line)
    return commands


def _training_runs(commands: list[str]) -> list[str]:
    """The commands that start training: a container with GPUs that is not a Ray daemon, or a command
    executed in the Ray head's container."""
    runs = []
    for command in commands:
        words = shlex.split(command, comments=True)
        if words[:2] == ["docker", "run"] and "--gpus" in words and "ray" not in words:
            runs.append(command)
        elif words[:2] == ["docker", "exec"] and "status" not in words:
            runs.append(command)
    return runs


def _recipe_of(command: str) -> Path:
    words = shlex.split(command, comments=True)
    scripts = [w for w in words if w.startswith("/opt/l2t-verl/recipes/")]
    assert len(scripts) == 1, f"not a recipe run: {command}"
    assert "l2t_verl.main" not in words, command
    if words[1] == "run":
        assert words[words.index("--entrypoint") + 1] == "bash", command
    return REPO / scripts[0].removeprefix("/opt/l2t-verl/")


def test_documented_runs_are_recipes() -> None:
    """A bare `l2t_verl.main` run gets verl's defaults (512-token prompts and responses, fixed
    micro-batches); the documented commands run a recipe, which sets the paper's settings."""
    header = _training_runs(_header_commands())
    readme = _training_runs(_readme_commands(DOCKER_README))
    assert header, "the Dockerfile header shows no docker run"
    assert len(readme) >= 2, "docker/README.md should show a one-node and a Ray-cluster run"
    config = REPO / "l2t_verl" / "config"
    for command in header + readme:
        script = _recipe_of(command)
        assert script.is_file(), script
        if script.name == "run.sh":  # recipes/run.sh SETTING VARIANT
            words = shlex.split(command, comments=True)
            setting, variant = words[words.index(f"/opt/l2t-verl/{script.relative_to(REPO)}") + 1 :][:2]
            assert (config / "recipe" / f"{setting}.yaml").is_file(), command
            assert (config / "algo" / f"{variant}.yaml").is_file() or (
                config / "ablation" / f"{variant.removeprefix('ablation_')}.yaml"
            ).is_file(), command
        else:
            assert re.fullmatch(r"run_\w+\.sh", script.name), script


LENGTH_AND_MICRO_BATCH_KEYS = (
    "data.max_prompt_length",
    "data.max_response_length",
    "actor_rollout_ref.actor.use_dynamic_bsz",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
    "l2t.penalty.max_token_len",
)


@pytest.mark.parametrize("path", [DOCKER_README, REPO / "README.md"], ids=["docker/README.md", "README.md"])
def test_cluster_commands_set_lengths_and_micro_batches(path: Path) -> None:
    commands = _readme_commands(path)
    hand_written = [c for c in commands if c.startswith("python -m l2t_verl.main") and "trainer.nnodes" in c]
    runs = _training_runs(commands) + hand_written
    assert runs, f"no cluster command in {path.name}"
    for command in runs:
        keys = {w.split("=", 1)[0] for w in shlex.split(command, comments=True) if "=" in w}
        missing = [k for k in LENGTH_AND_MICRO_BATCH_KEYS if k not in keys]
        assert not missing, f"{path.name}: {command[:80]}... does not set {missing}"
