"""Warnings collected while building a report (and echoed to stderr as they happen)."""

from __future__ import annotations

import sys


class Messages:
    """An ordered list of warnings: every problem with an input, named so a person can fix it.

    Loaders call :meth:`warn` instead of raising, so one corrupt file costs only its own
    content; the report shows the list at the top.
    """

    def __init__(self, echo: bool = True):
        self.echo = echo
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            if self.echo:
                print(f"warning: {message}", file=sys.stderr)

    def __iter__(self):
        return iter(self.warnings)

    def __len__(self) -> int:
        return len(self.warnings)
