"""The one progress reporter: a tqdm bar on stderr, silent when asked (``--json``) or in tests.

When stderr is not a terminal (a log file, a pipe, a job scheduler's output) a bar redrawn with
carriage returns would leave one long line, with the next message (a warning, the error) glued to
its end; there each new stage is one plain line instead (``segment:  10% prepare``).
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

__all__ = ["StageProgress"]


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
        isatty = getattr(self._stream, "isatty", None)
        if isatty is not None and isatty():
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
