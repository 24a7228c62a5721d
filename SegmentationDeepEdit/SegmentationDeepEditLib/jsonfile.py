"""The one JSON file reader for user-facing files: clear errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Type, Union

from .errors import DeepEditError, InputError

__all__ = ["read_json"]


def read_json(path: Union[str, Path], what: str = "file", error: Type[DeepEditError] = InputError) -> Any:
    """Parse a JSON file.

    Args:
        path: the file.
        what: what the file is, for the "not found" message (e.g. "training config").
        error: the error class to raise.

    Raises:
        ``error``: the file is missing, unreadable or not valid JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found", p)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what}: {e}", p) from None
    except json.JSONDecodeError as e:
        raise error(f"not valid JSON ({e})", p) from None
