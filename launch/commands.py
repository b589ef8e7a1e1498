"""Run (or, for ``--dry-run``, only print) the shell commands a launcher builds.

The launchers build commands as argument lists with pure functions; this is the one place that
executes them, so a dry run and a real run go through exactly the same sequence.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def render(argv: Sequence[str]) -> str:
    """The command as a user would type it (shell-quoted)."""
    return shlex.join(list(argv))


@dataclass
class Shell:
    """Executes argument lists; with ``dry_run`` it prints them instead and pretends they succeeded."""

    dry_run: bool = False
    echo: Callable[[str], None] = print
    history: list[list[str]] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, capture: bool = False, quiet: bool = False) -> Result:
        """Run ``argv``; ``capture`` returns its stdout instead of streaming it to the terminal."""
        argv = list(argv)
        self.history.append(argv)
        if self.dry_run or not quiet:
            self.echo(("" if self.dry_run else "$ ") + render(argv))
        if self.dry_run:
            return Result(0, "")
        try:
            proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None, check=False)
        except FileNotFoundError:
            return Result(127, f"{argv[0]}: command not found")
        return Result(proc.returncode, proc.stdout or "")
