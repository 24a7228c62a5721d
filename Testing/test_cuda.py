"""CUDA: the models give on the GPU what they give on the CPU; training runs with mixed precision there;
a GPU out of memory falls back to the CPU under ``--device auto`` and is a clear error under ``cuda``.

Skipped, with that reason, where torch finds no CUDA device (CI and most laptops). Run on a GPU
machine with `python -m pytest Testing/test_cuda.py -v` (the real-data tests also need ../shared/data
or $DEEPEDIT_SHARED_DATA). Inference on CUDA runs in float16 autocast for the automatic models and in
float32 for annotation, on the CPU in float32 here, so outputs agree closely but not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegmentationDeepEditLib.annotate import annotate
from SegmentationDeepEditLib.bundle import load_network
from SegmentationDeepEditLib.cli import main
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.geometry import same_geometry
from SegmentationDeepEditLib.imageio import read_image
from SegmentationDeepEditLib.labels import region_mask
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.points import extreme_points_from_mask
from SegmentationDeepEditLib.segment import segment_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False): run on a GPU machine")

REPO = Path(__file__).resolve().parents[1]
LIVER, GLIOMA, B2D = "liver-lesion", "glioma-regions", "brain-tumor-2d"


def _arr(img):
    return sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def ct_case():
    from SegmentationDeepEditLib.synthetic import make_ct_case

    return make_ct_case(11, spacing=(1.5, 1.5, 3.0), oblique=False, n_lesions=2)


def test_ct_annotation_on_cuda_equals_the_cpu(ct_case):
    img = ct_case.images["ct"]
    truth = sitk.Cast(sitk.BinaryThreshold(ct_case.label, 1, 2, 1, 0), sitk.sitkUInt8)
    pts = extreme_points_from_mask(truth)
    for tta in (False, True):
        cpu = annotate(img, pts, "deepedit-extreme-points-ct", device="cpu", tta=tta)
        gpu = annotate(img, pts, "deepedit-extreme-points-ct", device="cuda", tta=tta)
        assert gpu.device == "cuda" and cpu.device == "cpu"
        assert same_geometry(gpu.mask, img)
        a, b = _arr(cpu.mask) > 0, _arr(gpu.mask) > 0
        assert dice(a, b) >= 0.995, (tta, dice(a, b))
        assert abs(dice(b, _arr(truth) > 0) - dice(a, _arr(truth) > 0)) < 0.005


@pytest.mark.parametrize("fast", [True, False])
def test_liver_segmentation_on_cuda_equals_the_cpu(ct_case, fast):
    img = ct_case.images["ct"]
    cpu = segment_images(LIVER, {"ct": img}, device="cpu", fast=fast)
    gpu = segment_images(LIVER, {"ct": img}, device="cuda", fast=fast)
    assert gpu.device == "cuda" and same_geometry(gpu.label, img)
    a, b = _arr(cpu.label), _arr(gpu.label)
    assert dice(np.isin(a, [1, 2]), np.isin(b, [1, 2])) >= 0.99
    assert (a == b).mean() >= 0.998  # every class, voxel by voxel
    truth = np.isin(_arr(ct_case.label), [1, 2])
    assert dice(np.isin(b, [1, 2]), truth) >= 0.9


def test_cli_segment_on_cuda_reports_the_device_and_gpu_memory(ct_case, tmp_path, capsys):
    src = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_case.images["ct"], str(src))
    out = tmp_path / "liver.seg.nrrd"
    code = main(["segment", "--model", LIVER, "--fast", "--device", "cuda", "--json", "--input", f"ct={src}",
                 "-o", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and out.is_file()
    assert summary["device"] == "cuda" and summary["gpu_peak_mb"] > 1


def test_gpu_out_of_memory_falls_back_under_auto_and_is_an_error_under_cuda(ct_case, tmp_path, capsys):
    from SegmentationDeepEditLib import bundle as B

    img = ct_case.images["ct"]
    ref = segment_images(LIVER, {"ct": img}, device="cpu", fast=True)
    B._cache.clear()  # the network must be loaded onto the GPU again, under the limit
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6)  # a few hundred kB: the weights do not fit
    try:
        r = segment_images(LIVER, {"ct": img}, device="auto", fast=True)
        assert r.device == "cpu"
        assert (_arr(r.label) == _arr(ref.label)).all()
        with pytest.raises(InputError, match="GPU ran out of memory"):
            segment_images(LIVER, {"ct": img}, device="cuda", fast=True)
        src = tmp_path / "ct.nii.gz"
        sitk.WriteImage(img, str(src))
        out = tmp_path / "liver.nii.gz"
        assert main(["segment", "--model", LIVER, "--fast", "--device", "cuda", "--input", f"ct={src}",
                     "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert "GPU ran out of memory" in err and "--device auto" in err and not out.exists()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        B._cache.clear()
        torch.cuda.empty_cache()


def _tiny_liver_config(steps: int) -> dict:
    meta = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())["bundle"]
    meta["network"]["args"].update(channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
    meta["spacing_mm"] = [3.0, 3.0, 3.0]
    meta["segmentation"]["roi"] = [48, 48, 48]
    data = [{"synthetic": "ct", "cases": 2, "seed": 41, "options": {"spacing": 3.0, "oblique": False}}]
    return {"task": "segmentation", "seed": 5, "steps": steps, "batch_size": 4, "patch": [48, 48, 48],
            "optimizer": "adamw", "lr": 0.01, "loss": "dice_ce", "val_every": 50, "checkpoint_every": 50,
            "targets": {"kind": "classes", "n": 3, "class_sets": {"liver-lesion": {"1": [1], "2": [2]}}},
            "data": data, "validation": data[:1], "bundle": meta}


def test_segmentation_training_on_cuda_with_mixed_precision_learns(tmp_path):
    from SegmentationDeepEditLib.train_segment import train_segmentation

    s = train_segmentation(_tiny_liver_config(150), tmp_path / "run", data_root=tmp_path, device="cuda",
                           show_progress=False)
    with open(tmp_path / "run" / "log.csv") as f:
        rows = f.read().splitlines()
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert [r.split(",")[0] for r in rows[1:]] == ["50", "100", "150"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert s["validation_dice"]["class1"] >= 0.5, s  # the liver, learnt in 150 steps (0.73 on the CPU)
    net = load_network(s["bundle"], "cpu")  # the GPU-trained bundle runs on the CPU
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_annotation_training_on_cuda_runs_and_resumes(tmp_path):
    from SegmentationDeepEditLib.train import train

    from test_bundle import tiny_meta

    cfg = {"seed": 3, "steps": 60, "batch_size": 4, "lr": 0.003, "loss": "dice_ce", "jitter_mm": 1.0,
           "val_every": 30, "checkpoint_every": 30,
           "data": [{"synthetic": "ct", "cases": 1, "seed": 5, "objects": [["liver", "ct", [1, 2]]],
                     "options": {"spacing": 3.0, "oblique": False}}],
           "validation": [{"synthetic": "ct", "cases": 1, "seed": 5, "objects": [["liver", "ct", [1, 2]]],
                           "options": {"spacing": 3.0, "oblique": False}}],
           "bundle": dict(tiny_meta("tiny-cuda"), spacing_mm=[3.0, 3.0, 3.0]), "card": "# tiny-cuda\nA test bundle.\n"}
    train(dict(cfg, steps=30), tmp_path / "run", data_root=tmp_path, device="cuda", quiet=True)
    out = train(cfg, tmp_path / "run", data_root=tmp_path, device="cuda", resume=True, quiet=True)
    with open(tmp_path / "run" / "log.csv") as f:
        steps = [int(line.split(",")[0]) for line in f.read().splitlines()[1:] if line[:1].isdigit()]
    assert steps == sorted(steps) and steps[-1] == 60
    assert out["steps"] == 60 and np.isfinite(out["final_loss"])


# ------------------------------------------------------------------ real data (needs ../shared/data)

@pytest.mark.realdata
def test_glioma_regions_on_cuda_equal_the_cpu_on_a_real_case(shared_data):
    d = shared_data / "brain-tumor" / "brats2013-pat0004"
    images = {"t1c": read_image(d / "t1c.nii.gz"), "flair": read_image(d / "flair.nii.gz")}
    truth = read_image(d / "seg.nii.gz")
    scores = {}
    for dev in ("cpu", "cuda"):
        r = segment_images(GLIOMA, images, device=dev)  # the default TTA (flips)
        assert r.device == dev and same_geometry(r.label, images["t1c"])
        scores[dev] = {reg: (_arr(region_mask(r.label, "brats2017", reg)) > 0) for reg in ("WT", "TC", "ET")}
    t = {reg: _arr(region_mask(truth, "brats2013", reg)) > 0 for reg in ("WT", "TC")}
    for reg in ("WT", "TC", "ET"):
        assert dice(scores["cpu"][reg], scores["cuda"][reg]) >= 0.98, reg
    for reg in ("WT", "TC"):
        assert abs(dice(scores["cuda"][reg], t[reg]) - dice(scores["cpu"][reg], t[reg])) < 0.01, reg


@pytest.mark.realdata
def test_brain_tumor_2d_on_cuda_equals_the_cpu_at_every_tta_level(shared_data):
    pytest.importorskip("segmentation_models_pytorch", reason="segmentation-models-pytorch is not installed")
    d = shared_data / "brain-tumor" / "brats2013-pat0004"
    images = {"t1c": read_image(d / "t1c.nii.gz"), "flair": read_image(d / "flair.nii.gz")}
    for level in (0, 3):
        a = _arr(segment_images(B2D, images, device="cpu", tta=level).label)
        r = segment_images(B2D, images, device="cuda", tta=level)
        b = _arr(r.label)
        assert r.device == "cuda"
        assert dice(a > 0, b > 0) >= 0.98, level
        assert (a == b).mean() >= 0.998, level


@pytest.mark.realdata
def test_liver_on_cuda_equals_the_cpu_on_the_real_ct(shared_data):
    d = shared_data / "abdomen-ct" / "totalseg-example"
    ct = read_image(d / "ct.nii.gz")
    truth = _arr(read_image(d / "liver.nii.gz")) > 0
    for fast in (True, False):
        a = np.isin(_arr(segment_images(LIVER, {"ct": ct}, device="cpu", fast=fast).label), [1, 2])
        b = np.isin(_arr(segment_images(LIVER, {"ct": ct}, device="cuda", fast=fast).label), [1, 2])
        assert dice(a, b) >= 0.99, fast
        assert abs(dice(a, truth) - dice(b, truth)) < 0.005, fast


@pytest.mark.realdata
def test_brain_annotation_on_cuda_equals_the_cpu_on_a_real_case(shared_data):
    d = shared_data / "brain-tumor" / "brats2013-pat0004"
    img = read_image(d / "t1c.nii.gz")
    seg = read_image(d / "seg.nii.gz", what="label")
    core = sitk.GetImageFromArray(np.isin(_arr(seg), [1, 3, 4]).astype(np.uint8))
    core.CopyInformation(seg)
    pts = extreme_points_from_mask(core)
    a = _arr(annotate(img, pts, device="cpu").mask) > 0
    r = annotate(img, pts, device="cuda")
    b = _arr(r.mask) > 0
    assert r.device == "cuda" and dice(a, b) >= 0.995
    assert dice(b, _arr(core) > 0) >= 0.8
