"""The progress reporters: a tqdm bar on stderr, silent when asked (``--json``) or in tests.

When stderr is not a terminal (a log file, a pipe, a job scheduler's output) a bar redrawn with
carriage returns would leave one long line, with the next message (a warning, the error) glued to
its end; there each new stage is one plain line instead (``segment:  10% prepare``), and a long
count of steps (training) one line every ``every_s`` seconds and at its end
(``train: 1200/3000 (40%) 310 s, loss=0.231 val=0.812``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

__all__ = ["StageProgress", "StepProgress"]


def _on_terminal(stream: Optional[TextIO]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return isatty is not None and bool(isatty())


class StageProgress:
    """Progress of a job made of named stages, as a percentage bar (a line per stage off a terminal).

    Use as the ``progress(stage, fraction)`` callback the core functions accept.
    """

    def __init__(self, desc: str, enabled: bool = True, stream: Optional[TextIO] = None):
        self._bar = None
        self._desc = desc
        self._stream = stream if stream is not None else sys.stderr
        self._lines = False
        self._last = None
        if not enabled or self._stream is None:  # no stderr at all (a windowless process): silent
            return
        if _on_terminal(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=desc, unit="%", leave=False, file=self._stream,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        else:
            self._lines = True

    def __call__(self, stage: str, fraction: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(stage)
            self._bar.update(max(0, int(round(fraction * 100)) - self._bar.n))
        elif self._lines and stage != self._last:
            self._last = stage
            print(f"{self._desc}: {int(round(fraction * 100)):3d}% {stage}", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._lines = False

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()


class StepProgress:
    """Progress over a count of steps (training steps, cases loaded): a tqdm bar on a terminal,
    elsewhere one plain line every ``every_s`` seconds and one at the end, silent when disabled.

    Iterate over it (``for step in StepProgress(range(start, total), total=total, initial=start,
    desc="train")``) or call :meth:`update`; :meth:`set_postfix` adds figures to the next line,
    :meth:`write` prints a message on its own line.
    """

    def __init__(self, iterable: Optional[Iterable] = None, *, total: int, desc: str, initial: int = 0,
                 enabled: bool = True, stream: Optional[TextIO] = None, every_s: float = 30.0):
        self._iterable = iterable
        self.total, self.n, self._desc = int(total), int(initial), desc
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled and self._stream is not None
        self._bar = None
        self._postfix = ""
        self._every = float(every_s)
        self._t0 = self._last = time.monotonic()
        self._printed_at: Optional[int] = None
        if self._enabled and _on_terminal(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(iterable, total=self.total, initial=self.n, desc=desc, file=self._stream)

    def __iter__(self) -> Iterator:
        if self._bar is not None:
            yield from self._bar
            return
        for item in self._iterable if self._iterable is not None else ():
            yield item
            self.update()
        self._line()  # the end (also of a run resumed at its end)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
            return
        self.n += n
        if self._enabled and (time.monotonic() - self._last >= self._every or self.n >= self.total):
            self._line()

    def set_postfix(self, **figures: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**figures)
        self._postfix = " ".join(f"{k}={v}" for k, v in figures.items())

    def write(self, message: str) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def _line(self) -> None:
        if not self._enabled or self._bar is not None or self._printed_at == self.n:
            return
        self._printed_at, self._last = self.n, time.monotonic()
        pct = 100.0 * self.n / self.total if self.total else 100.0
        print(f"{self._desc}: {self.n}/{self.total} ({pct:.0f}%) {self._last - self._t0:.0f} s"
              + (f", {self._postfix}" if self._postfix else ""), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._line()
        self._enabled = False

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
