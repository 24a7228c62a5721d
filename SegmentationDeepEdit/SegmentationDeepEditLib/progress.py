"""The one progress reporter: a tqdm bar on stderr, silent when asked (``--json``) or in tests."""

from __future__ import annotations

from typing import Optional

__all__ = ["StageProgress"]


class StageProgress:
    """Progress of a job made of named stages, as a percentage bar.

    Use as the ``progress(stage, fraction)`` callback the core functions accept.
    """

    def __init__(self, desc: str, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=desc, unit="%", leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, stage: str, fraction: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(stage)
            self._bar.update(max(0, int(round(fraction * 100)) - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
