"""A small Dockerfile reader for the tests: stages, their instructions, and what RUN pip-installs.

Docker cannot build on the development machines, so the tests read the Dockerfile instead: this
module understands what our Dockerfile uses (line continuations, comments, ARG defaults, ``${X}``
and ``${X:+word}`` expansion, ``&&`` chains), not the whole Dockerfile grammar.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_EXPANSION = re.compile(r"\$\{(?P<name>\w+)(?::\+(?P<alt>[^}]*))?\}|\$(?P<bare>\w+)")
# pip options that take a value (so that value is not a requirement).
_PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                      "-f", "--find-links", "-t", "--target", "--prefix", "--root"}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass(frozen=True)
class PipInstall:
    """One ``pip install`` command: its requirements (ARGs expanded) and its options."""

    requirements: tuple[str, ...]
    options: tuple[str, ...]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def parent(self, stage: Stage) -> Stage | None:
        """The stage this one is built FROM, when it is built from another stage."""
        names = {s.name for s in self.stages}
        return self.stage(stage.base) if stage.base in names else None

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built from, itself first."""
        out = [stage]
        while (parent := self.parent(out[-1])) is not None:
            out.append(parent)
        return out

    def expand(self, text: str, stage: Stage) -> str:
        # As in Docker: a global ARG is seen inside a stage only when the stage declares it again.
        return expand(text, stage_args(self, stage))

    def pip_installs(self, stage: Stage) -> list[PipInstall]:
        """Every pip install in RUN instructions of the stage (not its parents)."""
        found = []
        for run in stage.all("RUN"):
            for command in _commands(self.expand(_strip_run_flags(run.args), stage)):
                install = _pip_install(command)
                if install is not None:
                    found.append(install)
        return found

    def apt_packages(self, stage: Stage) -> set[str]:
        packages: set[str] = set()
        for run in stage.all("RUN"):
            for command in _commands(self.expand(_strip_run_flags(run.args), stage)):
                if command[:2] == ["apt-get", "install"]:
                    packages |= {word for word in command[2:] if not word.startswith("-")}
        return packages

    def copied_from(self, stage: Stage, destination: str) -> Stage | None:
        """The stage a ``COPY --from=STAGE ... DESTINATION`` in ``stage`` copies from."""
        for copy in stage.all("COPY"):
            words = shlex.split(copy.args)
            source = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            if source is not None and words[-1].rstrip("/") == destination.rstrip("/"):
                return self.stage(source)
        return None


def stage_args(dockerfile: Dockerfile, stage: Stage) -> dict[str, str]:
    """ARG values in a stage: a bare ``ARG X`` takes the global default, as Docker does."""
    values: dict[str, str] = {}
    for owner in reversed(dockerfile.chain(stage)):
        values |= owner.args
    return values


def expand(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group("name") or match.group("bare")
        value = values.get(name, "")
        if match.group("alt") is not None:
            return match.group("alt") if value else ""
        return value

    return _EXPANSION.sub(one, text)


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text()):
        keyword, args = instruction.keyword, instruction.args
        if keyword == "FROM":
            words = args.split()
            base = expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
        elif keyword == "ARG":
            name, _, default = (part.strip() for part in args.partition("="))
            target = stages[-1].args if stages else global_args
            target[name] = default.strip('"') if default else global_args.get(name, "")
        elif stages:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def _instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def _strip_run_flags(args: str) -> str:
    # RUN --mount=... --network=... command: the flags are Docker's, not the shell's.
    return re.sub(r"^(--\S+\s+)+", "", args)


def _commands(shell: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"&&|;|\|\|", shell) if part.strip()]


def _pip_install(command: list[str]) -> PipInstall | None:
    words = command
    if len(words) >= 3 and words[1:3] == ["-m", "pip"]:
        words = ["pip", *words[3:]]
    if len(words) < 2 or Path(words[0]).name not in ("pip", "pip3") or words[1] != "install":
        return None
    requirements: list[str] = []
    options: list[str] = []
    rest = iter(words[2:])
    for word in rest:
        if word in _PIP_VALUE_OPTIONS:
            options += [word, next(rest)]
        elif word.startswith("-"):
            options.append(word)
        else:
            requirements.append(word)
    return PipInstall(tuple(requirements), tuple(options))
