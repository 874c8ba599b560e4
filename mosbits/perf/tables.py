"""Plain-text output shared by the command-line tools: aligned tables and a progress bar on stderr."""

from __future__ import annotations

import sys


def format_table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """Plain-text table, one ``align`` letter per column (``l`` or ``r``), headers over a rule of dashes."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(wd) if a == "l" else c.rjust(wd)
                  for c, wd, a in zip(cells, widths, align, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * wd for wd in widths]), *(line(row) for row in rows)])


class Progress:
    """A progress bar on stderr: rewritten in place on a terminal, one line per step otherwise.

    ``total`` may be 0 for a message-only progress line.
    """

    WIDTH = 24

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.done = 0

    def show(self, message: str) -> None:
        """Show ``message`` (with the bar when there is a total) without counting a step."""
        if self.total:
            filled = self.WIDTH * self.done // self.total
            message = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} {message}"
        if sys.stderr.isatty():
            sys.stderr.write(f"\r\033[K{message}")
        else:
            sys.stderr.write(f"{message}\n")
        sys.stderr.flush()

    def step(self, message: str) -> None:
        """Count one step done, then show ``message`` (what comes next)."""
        self.done += 1
        self.show(message)

    def clear(self) -> None:
        """Erase the bar on a terminal, before stdout writes."""
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
