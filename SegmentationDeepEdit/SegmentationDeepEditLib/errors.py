"""Errors the core raises for bad input; the CLI turns them into one-line messages."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = ["DeepEditError", "InputError", "NotSkullStripped", "ModelError", "TrainingError"]


class DeepEditError(Exception):
    """Base class of every error the core reports to a user.

    Args:
        message: what is wrong, in words a user understands.
        path: the file or folder the problem is about, if any; it is put first in the message.
    """

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(DeepEditError):
    """A bad image, point file, argument or output path."""


class NotSkullStripped(InputError):
    """An MRI input still has the head around the brain, for a model trained on skull-stripped
    brains (the batch keeps such a study's registration and reports it as not segmented)."""


class ModelError(DeepEditError):
    """A missing, invalid or corrupt model bundle."""


class TrainingError(DeepEditError):
    """A training run that cannot go on: its loss or its weights are no longer numbers (it diverged)."""
