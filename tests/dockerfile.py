"""deploy/Dockerfile read statically for the deployment tests (no Docker engine here):
its global ARGs and stages, each instruction with its continuation lines joined."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, cmd: str) -> list[str]:
        return [args for c, args in self.instructions if c == cmd]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each instruction's continuation lines joined
    (comment lines inside one are dropped, as Docker does)."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        cmd, _, rest = line.partition(" ")
        cmd, rest = cmd.upper(), rest.strip()
        if cmd == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"FROM {rest!r}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: args[g.group(1) or g.group(2)],
                          m.group(1))
            stages.append(Stage(name=m.group(2) or f"#{len(stages)}", base=base))
        elif not stages:
            assert cmd == "ARG", f"only ARG may come before the first FROM, not {cmd}"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((cmd, rest))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of a stage (the only form this Dockerfile uses)."""
    out: dict[str, str] = {}
    for args in stage.all("ENV"):
        for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args):
            out[key] = value.strip('"')
    return out


def stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """The stages of a Dockerfile by name."""
    return {s.name: s for s in parse(path.read_text())[1]}


__all__ = ["DOCKERFILE", "Stage", "env_of", "parse", "stages"]
