"""What ``alignd jobs follow``, the list commands and ``alignd demo`` print: one implementation.

Progress bars, tables and sparklines are drawn with ``rich`` when the output is a terminal, and
degrade to plain lines otherwise (a log file, a pipe, CI): no ANSI escape codes, no redraws, one
line per change, columns aligned with spaces so that ``grep`` and ``awk`` work on them.

It lives in ``service/`` because both sides print with it: the HTTP client commands
(``service/cli_client.py``, which must not import ``workers``) and the demo (``workers/demo.py``,
which may import ``service``). rich is imported only when a terminal is drawn.

:func:`quiet_libraries` keeps the training stack's chatter (tqdm bars such as transformers'
"Loading weights", FutureWarnings, library log lines) off the user's screen; the entry points call it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast, overload

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

BAR_WIDTH = 24
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
#: The metric shown beside the loss, first match wins: DPO/reward models, PPO, reinforcement.
SIDE_METRICS = (("rewards/margins", "margin"), ("objective/kl", "kl"), ("reward", "reward"))
#: Loggers of the training stack whose records belong in a log file, not on the terminal.
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "torch", "safetensors",
                   "py.warnings")
_LIBRARY_MODULES = r"(torch|transformers|peft|accelerate|datasets|huggingface_hub|safetensors|trl)(\.|$)"


def sparkline(values: Sequence[float]) -> str:
    """``▁▂▅█``: each value scaled between the series' min and max (a flat series is all ``▁``)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK_BLOCKS[round((v - lo) / span * (len(SPARK_BLOCKS) - 1))] for v in values)


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def event_line(event: dict[str, Any]) -> str:
    """A job event as one line: ``05:25:01 · Checkpoint saved at step 2`` (``[warn]``/``[error]`` marks)."""
    level = event.get("level", "info")
    mark = "·" if level == "info" else f"[{level}]"
    return f"{time.strftime('%H:%M:%S', time.localtime(event['created_at']))} {mark} {event['message']}"


class Output:
    """A stream the CLI and the demo write to: rich when it is a terminal, plain lines otherwise.

    ``terminal`` overrides the ``isatty()`` check; ``console`` (tests: ``Console(force_terminal=True)``)
    brings its own rich console and decides by its ``is_terminal``."""

    def __init__(self, file: TextIO | None = None, *, terminal: bool | None = None,
                 console: Console | None = None) -> None:
        self.file: TextIO = file or (cast(TextIO, console.file) if console is not None else sys.stdout)
        if console is not None:
            self.terminal = console.is_terminal
        else:  # an Emacs shell or a CI log viewer says TERM=dumb: it cannot redraw a line
            self.terminal = (_isatty(self.file) and os.environ.get("TERM") != "dumb") if terminal is None else terminal
        self._console = console

    @property
    def console(self) -> Console:
        """The rich console (terminal output only)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.file, force_terminal=True, highlight=False, soft_wrap=True)
        return self._console

    def line(self, text: str = "", style: str | None = None) -> None:
        """One line of text; ``style`` (rich's, e.g. ``"bold"``) applies in a terminal only."""
        if self.terminal:
            self.console.print(text, style=style, markup=False, highlight=False)
        else:
            self.file.write(text + "\n")
            self.file.flush()

    def table(self, rows: Sequence[Sequence[Any]], header: Sequence[str], title: str | None = None) -> None:
        """Columns: a rich table in a terminal, space-aligned plain columns (header first) otherwise."""
        cells = [[str(cell) for cell in row] for row in rows]
        if self.terminal:
            from rich import box
            from rich.table import Table

            table = Table(*header, title=title, box=box.SIMPLE_HEAD, title_justify="left", header_style="bold")
            for column in table.columns:
                column.overflow = "fold"  # a narrow terminal folds cells onto more lines, never cuts them short
            for row in cells:
                table.add_row(*row)
            self.console.print(table)
            return
        if title:
            self.line(title)
        widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]
        for row in [list(header), *cells]:
            self.line("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

    def job_progress(self) -> JobProgress:
        return JobProgress(self)


class JobProgress:
    """A job's live progress: bar, step/total, percentage, ETA (the job's ``estimated_finish``), the
    latest loss and margin / KL / reward, a reinforcement job's latest eval reward, and its status.

    Feed it every event (:meth:`observe`), then :meth:`draw` the job after each poll. A terminal gets
    one rich bar redrawn in place, with event lines (:meth:`message`) printed above it; anything else
    gets one plain line each time the step, status or metrics change. It keeps each metric's series,
    so :meth:`curves` can print sparklines when the job ends."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self.metrics: dict[str, float] = {}
        self.series: dict[str, dict[int, float]] = {}
        self.metrics_step = 0
        self.shown_key: tuple[Any, ...] | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def observe(self, event: dict[str, Any]) -> None:
        if event.get("type") != "metrics":
            return
        data = event.get("data") or {}
        step = int(data.get("step") or 0)
        for name, value in data.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and name != "step":
                self.metrics[name] = float(value)
                self.series.setdefault(name, {})[step] = float(value)
        self.metrics_step = max(self.metrics_step, step)

    def _state(self, job: dict[str, Any]) -> tuple[tuple[Any, ...], int, int | None, list[str]]:
        """What the line shows, as text parts after the bar (shared by both renderings)."""
        progress = job.get("progress") or {}
        # Events are read before the job, so the metrics may be a step ahead of the job's progress.
        step, total = max(int(progress.get("step") or 0), self.metrics_step), progress.get("total_steps")
        parts = [f"{step}/{total or '?'}"]
        if total:
            parts.append(f"{100 * step / total:3.0f}%")
        eta = job.get("estimated_finish")
        if eta and job["status"] == "running":
            parts.append(f"ETA {duration(eta - time.time())}")
        loss = self.metrics.get("loss")
        side = next(((label, self.metrics[name]) for name, label in SIDE_METRICS if name in self.metrics), None)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if side is not None:
            parts.append(f"{side[0]} {side[1]:.4f}")
        eval_reward = self.metrics.get("eval/reward")  # reinforcement: the latest evaluation's mean reward
        if eval_reward is not None:
            parts.append(f"eval reward {eval_reward:.4f}")
        parts.append(job["status"])
        return (job["status"], step, total, loss, side, eval_reward), step, total, parts

    def line(self, job: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
        """The plain rendering: ``[######..................]  1/4   25%  ETA 26s  loss 0.6931 …``."""
        key, step, total, parts = self._state(job)
        filled = int(BAR_WIDTH * step / total) if total else 0
        return key, "  ".join([f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]", *parts])

    def draw(self, job: dict[str, Any]) -> None:
        if not self.output.terminal:
            key, text = self.line(job)
            if key != self.shown_key:
                self.output.line(text)
            self.shown_key = key
            return
        key, step, total, parts = self._state(job)
        description = "  ".join(parts)
        if self._bar is None:
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(BarColumn(bar_width=BAR_WIDTH), TextColumn("{task.description}", markup=False),
                                 console=self.output.console, auto_refresh=False, redirect_stdout=False,
                                 redirect_stderr=False)
            self._task = self._bar.add_task(description, total=total, completed=step)
            self._bar.start()  # draws it
        else:
            assert self._task is not None
            self._bar.update(self._task, completed=step, total=total, description=description)
            self._bar.refresh()
        self.shown_key = key

    def message(self, text: str) -> None:
        """An event line: above the bar in a terminal (the bar stays at the bottom)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self.output.line(text)

    def finish(self) -> None:
        """Leave the last bar on screen and end the live display (terminal); nothing to do otherwise."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def curves(self, names: Sequence[tuple[str, str]] | None = None) -> list[str]:
        """``loss    ▇▅▃▂▁  0.6931 → 0.6637 over 4 steps`` for each series the job reported (by default the
        loss and the side metric)."""
        if names is None:
            names = [("loss", "loss"), *SIDE_METRICS]
        rows = []
        for name, label in names:
            points = self.series.get(name)
            if points and len(points) > 1:
                values = [points[s] for s in sorted(points)]
                rows.append((label, f"{sparkline(values)}  {values[0]:.4f} → {values[-1]:.4f} over "
                                    f"{len(values)} steps"))
        width = max((len(label) for label, _ in rows), default=0)
        return [f"{label.ljust(width)}  {text}" for label, text in rows]


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


@overload
def quiet_libraries(log_file: Path) -> logging.Handler: ...


@overload
def quiet_libraries(log_file: None = None) -> None: ...


def quiet_libraries(log_file: Path | None = None) -> logging.Handler | None:
    """Keep the training stack's chatter off the terminal. Entry points call it before any library loads.

    - tqdm bars (transformers' "Loading weights", huggingface_hub and datasets downloads) are off: the
      environment switches are read at import time and inherited by child processes (the worker).
    - FutureWarning / DeprecationWarning are ignored; with ``log_file``, every other warning is logged
      there (``logging.captureWarnings``), without one those the libraries raise are ignored too.
    - With ``log_file``, the libraries' loggers (transformers, peft, accelerate, …) write to it and
      no longer to stderr. transformers installs its own stderr handler when it is first imported;
      :func:`drop_library_stderr_handlers` removes it once that has happened. Returns the file's handler,
      for the caller's own logger."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning from the tokenizers library
    # Child processes (``alignd serve`` → worker, ``alignd demo`` → the demo) inherit the same filters.
    inherited = "ignore::FutureWarning,ignore::DeprecationWarning"
    current = os.environ.get("PYTHONWARNINGS")
    if not current:
        os.environ["PYTHONWARNINGS"] = inherited
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if log_file is None:
        warnings.filterwarnings("ignore", category=UserWarning, module=_LIBRARY_MODULES)
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    drop_library_stderr_handlers()
    return handler


def drop_library_stderr_handlers() -> None:
    """Remove the stderr handlers that libraries added to their own loggers on import (transformers
    does, with ``propagate = False``), keeping any file handler :func:`quiet_libraries` installed.

    Works on the loggers by name, so ``service/`` still imports none of those libraries."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # FileHandler subclasses it and stays
                logger.removeHandler(handler)
        if logger.handlers:  # transformers turns propagation back on where CI is set
            logger.propagate = False
