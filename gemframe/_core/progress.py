"""The progress bar of a job, and its failure summary.

A `Progress` counts a job's answered rows, cache hits, errors and tokens, and draws one bar
unless disabled. The text bar keeps rate, hits, errors and tokens on the left of the bar
itself, so an 80-column terminal cuts the bar, never the figures. A notebook gets the
ipywidgets bar when ipywidgets is installed (``pip install "gemframe[notebook]"``), else the
text bar, silently (tqdm.auto would warn ``IProgress not found`` on every import).

When the job ends with failed rows, `Progress.close` emits one `RowsFailedWarning` saying how
many failed, by status, and the first message: with ``progress=False`` nothing else tells the
user. `job` shares one `Progress` between the calls of one expression (the streaming engine's
morsels, at the same time or one after another), so a job draws one bar and warns once.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, cast

from .limits import IDLE_RESTART

_POSTFIX_SECONDS = 0.05  # half tqdm's redraw interval: a redraw shows figures at most that old
# Rows whose answer is still to come (Batch Mode with wait=False) have not failed.
_NOT_FAILED = frozenset({"BATCH_PENDING"})
_MESSAGE_CHARS = 300  # the first failure's message, at most

# The text bar: the figures first, the bar last (it takes what width is left, at least one
# cell; a narrower terminal cuts it off, not the figures). The widget shows the usual layout.
# The rate is in the postfix, to three figures (tqdm's "60000.00row/s" would not fit).
_TEXT_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}] |{bar}|"
_WIDGET_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class RowsFailedWarning(UserWarning):
    """Rows of a call (or `gemframe.run` job) failed; each one's reason is in its reply's
    ``error`` field. Emitted once per job, after it ends. Always shown (not only the first
    time, as Python shows a repeated warning), because each job's failures are news;
    ``warnings.filterwarnings("ignore", category=gf.RowsFailedWarning)`` silences it."""


# Shown every time: Python's default shows a warning once per message and code location, so
# a second job failing the same way would be silent. Appended: the user's filters come first.
warnings.filterwarnings("always", category=RowsFailedWarning, append=True)


def _bar_class() -> type:
    """tqdm's widget bar in a Jupyter kernel that has ipywidgets, else the text bar. Chosen
    here, not by ``tqdm.auto``, which warns (TqdmWarning: IProgress not found) when a kernel
    lacks ipywidgets; the text bar works there as well."""
    from tqdm.std import tqdm

    text_bar: type = tqdm  # tqdm has no type hints (its classes are Any to mypy)
    try:
        shell = sys.modules["IPython"].get_ipython()
        in_kernel = shell is not None and "IPKernelApp" in shell.config
    except Exception:  # no IPython, or not a kernel (a terminal IPython draws the text bar)
        return text_bar
    if not in_kernel:
        return text_bar
    try:
        import ipywidgets  # noqa: F401
        from tqdm.notebook import IProgress
        from tqdm.notebook import tqdm as widget_bar
    except ImportError:
        return text_bar
    return cast(type, widget_bar) if IProgress is not None else text_bar


def _figure(n: int) -> str:
    """A count, exact below a million (107,690), else to four figures (12.35M)."""
    if n < 1_000_000:
        return f"{n:,}"
    for value, suffix in ((n / 1e6, "M"), (n / 1e9, "G")):
        digits = 2 if value < 100 else 1
        if round(value, digits) < 1000 or suffix == "G":
            return f"{value:.{digits}f}{suffix}"
    raise AssertionError


def _rate(rows_per_second: float | None) -> str:
    """``34.1 rows/s``, ``934 rows/s``, ``2,043 rows/s``, ``60.2k rows/s``."""
    if not rows_per_second:
        return "? rows/s"
    if rows_per_second >= 9999.5:
        return f"{rows_per_second / 1000:.1f}k rows/s"
    if rows_per_second >= 999.5:
        return f"{rows_per_second:,.0f} rows/s"
    return f"{rows_per_second:.{0 if rows_per_second >= 99.95 else 1 if rows_per_second >= 9.995 else 2}f} rows/s"


class Progress:
    """Counts a job's answered rows; draws a bar unless disabled; tallies failures.

    ``owned``: closed by the `Client.send` call that made it (else by whoever made it, who may
    share it between calls, as `gemframe.run` does). ``label`` names the bar."""

    def __init__(
        self, total: int | None, enabled: bool, model: str | None = None, owned: bool = False, label: str = ""
    ) -> None:
        self.owned = owned  # closed by the call that made it
        self.model = model
        self.label = label
        self.rows = 0
        self.cached = 0
        self.errors = 0
        self.tokens = 0
        self.failures: Counter[str] = Counter()  # status -> rows (BATCH_PENDING excluded)
        self.first_failure: tuple[int, str] | None = None  # (row, message) of the lowest row
        self.callers = 0  # `job`: calls sharing this bar right now (0: resting)
        self.raised = False  # `job`: a call of the job ended with an exception
        self.waiting_on: list[tuple[int, FrameType]] = []  # `job`: the polars calls that run it
        self._lock = threading.Lock()  # streaming morsels advance one bar from several threads
        self._bar = None
        if enabled:
            bar = _bar_class()
            form = _TEXT_FORMAT if bar.__module__ == "tqdm.std" else _WIDGET_FORMAT
            desc = f"gemframe {label}" if label else "gemframe"
            self._bar = bar(total=total, desc=desc, unit=" rows", dynamic_ncols=True, bar_format=form)
        self._postfix_at = 0.0
        self._status: dict[str, str] = {}

    def advance(self, record: dict[str, Any], row: int = 0, tokens: bool = True) -> None:
        """One row answered. ``tokens``: count the answer's tokens (False for the other rows
        that shared its request: they were paid for once)."""
        with self._lock:
            self.rows += 1
            if record.get("cached"):
                self.cached += 1
            elif tokens and record.get("total_tokens"):
                self.tokens += record["total_tokens"]
            error = record.get("error")
            if error is not None:
                self.errors += 1
                if isinstance(error, dict) and error.get("status") not in _NOT_FAILED:
                    self.failures[error.get("status") or "ERROR"] += 1
                    if self.first_failure is None or row < self.first_failure[0]:
                        self.first_failure = (row, str(error.get("message") or ""))
            if self._bar is not None:
                now = time.monotonic()
                if now - self._postfix_at > _POSTFIX_SECONDS:  # before the redraw update may do
                    self._postfix_at = now
                    self._bar.set_postfix_str(self.postfix(), refresh=False)
                self._bar.update(1)

    def add_total(self, rows: int | None) -> None:
        """Another call joined the job with ``rows`` to answer."""
        with self._lock:
            if self._bar is not None and rows is not None and self._bar.total is not None:
                self._bar.total += rows
                self._bar.refresh()

    def postfix(self) -> str:
        """``34.1 rows/s, hits 120, err 3, tok 107,690`` and any status fields: short, so
        they fit. The rate is tqdm's (smoothed), read when the postfix is set."""
        rate = None
        if self._bar is not None:  # tqdm's smoothed rate; before its first redraw, the mean
            shown = self._bar.format_dict
            rate = shown.get("rate") or (shown["n"] / shown["elapsed"] if shown["elapsed"] else None)
        rate = _rate(rate)
        fields = {
            "hits": _figure(self.cached),
            "err": _figure(self.errors),
            "tok": _figure(self.tokens),
            **self._status,
        }
        return ", ".join([rate, *(f"{k} {v}" for k, v in fields.items())])

    def status(self, **fields: str) -> None:
        """Extra postfix fields, e.g. a batch job's state."""
        self._status.update(fields)
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix())

    def failure_summary(self) -> str | None:
        """``4 of 4 rows failed: INVALID_INPUT x4; row 0: cannot read ...; see ...``, or None."""
        if not self.failures:
            return None
        failed = sum(self.failures.values())
        kinds = ", ".join(f"{status} x{n:,}" for status, n in self.failures.most_common())
        message = ""
        if self.first_failure is not None:
            row, text = self.first_failure
            if len(text) > _MESSAGE_CHARS:
                text = text[: _MESSAGE_CHARS - 3] + "..."
            message = text if text.startswith("row ") else f"row {row}: {text}"
            message = f"{message}; "
        return f"{failed:,} of {self.rows:,} rows failed: {kinds}; {message}see the reply's `error` field"

    def rest(self) -> None:
        """Draw the figures so far (the last row's update may not have redrawn the bar) and
        leave the bar open: the job's next call may continue it (see `job`)."""
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self.postfix(), refresh=False)
                self._bar.refresh()

    def close(self, warn: bool = True) -> None:
        """Draw the final figures and end the bar; ``warn``: one `RowsFailedWarning` if rows
        failed (not when the job ends with an exception, which says more)."""
        with self._lock:  # a closing thread (idle timer, atexit) against a late advance
            if self._bar is not None:
                self._bar.set_postfix_str(self.postfix(), refresh=False)
                self._bar.close()
                self._bar = None
        summary = self.failure_summary() if warn else None
        if summary is not None:
            self.failures.clear()  # closed twice (an owner's finally): warned once
            warnings.warn(summary, RowsFailedWarning, stacklevel=2)


_jobs: dict[Hashable, Progress] = {}  # open jobs: a call running, or resting between calls
_jobs_lock = threading.Lock()
_running = 0  # calls of any job running now
_idle_since = 0.0  # when the last running call ended
_watcher: threading.Thread | None = None  # ends resting jobs (see `_watch`), while any rests


@contextmanager
def job(
    key: Hashable, total: int | None, enabled: bool, model: str | None = None, label: str = ""
) -> Iterator[Progress]:
    """The `Progress` of ``key``'s job, for one call of it: one bar and one failure warning
    per job, a job being one polars call of the user's (a ``with_columns``, ``collect``,
    ``sink_parquet``), however many calls it makes of one expression.

    Polars calls an expression once per chunk or morsel: at the same time on several of its
    threads, or one after another (one thread, ``POLARS_MAX_THREADS=1``; an eager frame read
    from a file of several row groups). Calls running together share the bar, whose total
    grows as each joins. When the last running call ends, the job "rests" rather than ends,
    since nothing tells a callback that its morsel was the last: the next call of the same key
    continues the bar (and the tally). A resting job ends (`Progress.close`: the final figures
    and newline, then the one `RowsFailedWarning` for the whole job) when

    - the polars call that made it returns: the threads that were inside polars when its
      first call began are watched (`_watch`, every `_POSTFIX_SECONDS`), so the warning
      follows the end of the user's call within a redraw interval;
    - a call starts (a bar is to be drawn after theirs) and the job's polars call returned,
      or, for a call on a thread Python started (see `_on_callers_thread`: a new polars call
      of the user's), no caller was found;
    - gemframe has been idle for `IDLE_RESTART` seconds (no call of any job running): the
      bound when no caller was found, or when one is another thread's unrelated polars call.
      That is the executor's notion of a job (its window starts again then); it keeps the bar
      of one expression resting while another of the same query runs (two ``gf.generate`` in
      one ``with_columns``: their calls alternate);
    - the process exits (atexit).

    A call on the caller's own thread ends its job at once: polars runs an eager frame's
    expression there, once, over the whole column. So does a call that raised: polars stops
    the query, no call will follow. Bars of different keys open at once get distinct labels
    (``#2``)."""
    global _running, _idle_since
    own_thread = _on_callers_thread()
    with _jobs_lock:  # first end the jobs this call is not part of: its bar comes after theirs
        over = _pop_resting(_not_waiting if own_thread else _call_returned)  # before `_watch` does
    _close_all(over)
    with _jobs_lock:
        _running += 1
        progress = _jobs.get(key)
        if progress is None:
            open_labels = {p.label for p in _jobs.values()}
            unique, n = label, 1
            while unique in open_labels:
                n += 1
                unique = f"{label} #{n}"
            progress = _jobs[key] = Progress(total, enabled, model, label=unique)
            progress.waiting_on = [] if own_thread else _polars_callers()
        else:
            progress.add_total(total)
        progress.callers += 1
    ended = False
    try:
        yield progress
        ended = True
    finally:
        with _jobs_lock:
            _running -= 1
            _idle_since = time.monotonic()
            progress.callers -= 1
            progress.raised |= not ended
            last = progress.callers == 0
            end_now = last and (own_thread or progress.raised)
            if end_now:
                del _jobs[key]
            elif last:
                _start_watcher()
        if end_now:
            progress.close(warn=not progress.raised)
        elif last:
            progress.rest()


def _on_callers_thread() -> bool:
    """Whether this call runs on a thread Python started (the one that called polars, as for
    an eager frame), not on one of polars' own threads: those threads were not started by
    `threading`, which names them ``Dummy-N`` (a ``_DummyThread``)."""
    return not isinstance(threading.current_thread(), _FOREIGN_THREAD)


# Private to threading, but there since Python 2; were it gone, every call would be taken for
# the caller's and end its job at once (a bar per morsel again, never a late warning).
_FOREIGN_THREAD: Any = getattr(threading, "_DummyThread", ())


def _polars_callers() -> list[tuple[int, FrameType]]:
    """The Python threads waiting in a polars call now (their innermost Python frame is
    polars' own), with that frame: one of them made the call that runs this job."""
    polars = sys.modules.get("polars")
    if polars is None or not polars.__file__:
        return []
    home = os.path.dirname(polars.__file__) + os.sep
    me = threading.get_ident()
    return [(t, f) for t, f in sys._current_frames().items() if t != me and f.f_code.co_filename.startswith(home)]


def _returned(progress: Progress) -> bool | None:
    """Whether the polars calls a job was waiting on have all returned (their frame is off
    their thread's stack); None when none was found."""
    if not progress.waiting_on:
        return None
    stacks = sys._current_frames()
    for thread, frame in progress.waiting_on:
        inner = stacks.get(thread)
        while inner is not None:
            if inner is frame:
                return False
            inner = inner.f_back
    return True


def _start_watcher() -> None:
    """Start `_watch` unless it runs (called under `_jobs_lock` as a job starts to rest)."""
    global _watcher
    if _watcher is None:
        _watcher = threading.Thread(target=_watch, name="gemframe-progress", daemon=True)
        _watcher.start()


def _watch() -> None:
    """End each resting job when its polars call returns, or all of them once gemframe has
    been idle `IDLE_RESTART` seconds; stop when none rests. A daemon thread: never keeps the
    process alive (atexit ends what rests)."""
    global _watcher
    me = threading.current_thread()
    try:
        while _watcher is me:
            time.sleep(_POSTFIX_SECONDS)
            with _jobs_lock:
                idle = not _running and time.monotonic() - _idle_since >= IDLE_RESTART
                ended = _pop_resting(_every if idle else _call_returned)
                if not any(p.callers == 0 for p in _jobs.values()):
                    _watcher = None
            _close_all(ended)
    finally:
        with _jobs_lock:
            if _watcher is me:  # ended by an error (-W error): the next job to rest starts another
                _watcher = None


def end_resting_jobs() -> None:
    """End the resting jobs now, oldest first: each bar's final figures and newline, then its
    failure warning (see `job`)."""
    with _jobs_lock:
        ended = _pop_resting(_every)
    _close_all(ended)


def _every(progress: Progress) -> bool:
    return True


def _call_returned(progress: Progress) -> bool:
    return _returned(progress) is True


def _not_waiting(progress: Progress) -> bool:
    """Its polars call returned, or none was found (a call on the caller's thread ends it)."""
    return _returned(progress) is not False


def _pop_resting(ends: Callable[[Progress], bool]) -> list[Progress]:
    """Take the resting jobs that ``ends`` out of `_jobs` (under `_jobs_lock`), oldest first."""
    keys = [key for key, progress in _jobs.items() if progress.callers == 0 and ends(progress)]
    return [_jobs.pop(key) for key in keys]


def _close_all(progresses: list[Progress]) -> None:
    """Close each; a warning turned into an error (``-W error``) by one still closes the rest."""
    for i, progress in enumerate(progresses):
        try:
            progress.close(warn=not progress.raised)
        except BaseException:
            _close_all(progresses[i + 1 :])
            raise


atexit.register(end_resting_jobs)
