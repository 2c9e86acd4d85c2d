"""Progress display for long steps: rich progress bars on stderr, or nothing when quiet."""

from __future__ import annotations

import contextlib
import sys


class _Task:
    def __init__(self, progress=None, task_id=None):
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Progress:
    """`task(...)` gives a bar, `spinner(...)` wraps an operation of unknown length, `done(...)` logs a step."""

    def __init__(self, *, quiet: bool = False, console=None):
        self.quiet = quiet
        if not quiet and console is None:
            from rich.console import Console

            console = Console(file=sys.stderr)
        self.console = console

    def task(self, description: str, total: int) -> _Task:
        if self.quiet:
            return _Task()
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=True)
        progress.start()
        return _Task(progress, progress.add_task(description, total=total))

    @contextlib.contextmanager
    def spinner(self, description: str):
        if self.quiet:
            yield
            return
        with self.console.status(description):
            yield

    def done(self, step: str, seconds: float, summary: str = "", *, passed: bool = True) -> None:
        """One line per finished step: a check mark, or a cross when the step's gate failed."""
        if not self.quiet:
            mark = "[green]✓[/green]" if passed else "[red]✗[/red]"
            self.console.print(f"{mark} {step:<9} {seconds:6.1f}s  {summary}", highlight=False)

    def print(self, *args, **kwargs) -> None:
        if not self.quiet:
            self.console.print(*args, **kwargs)
