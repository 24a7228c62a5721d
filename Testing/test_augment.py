"""Batch augmentations (SegmentationDeepEditLib.augment): geometry, label codes, reproducibility, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SegmentationDeepEditLib.augment import batch_augment, check_batch_augment
from SegmentationDeepEditLib.errors import InputError


def _batch():
    """Two patches [B, 1, 24, 32, 32]: a bright block (class code 2) in air (background code 1)."""
    x = torch.zeros(2, 1, 24, 32, 32)
    y = torch.ones(2, 24, 32, 32, dtype=torch.int16)
    x[:, :, 8:16, 6:26, 12:20] = 1.0
    y[:, 8:16, 6:26, 12:20] = 2
    return x, y


def test_no_augmentation_returns_the_batch_and_draws_nothing():
    x, y = _batch()
    rng = np.random.default_rng(1)
    ox, oy = batch_augment(x, y, {"flip_axes": [0]}, rng)
    assert ox is x and oy is y
    assert rng.random() == np.random.default_rng(1).random()  # the stream is untouched


def test_a_rotation_turns_image_and_label_together_and_pads_with_background():
    from SegmentationDeepEditLib.augment import turn

    x, y = _batch()
    tx, ty = turn(x[0], y[0], (np.pi / 2, 0.0, 0.0), 1.0, y_background=1)  # a quarter turn about k
    assert tx.shape == x[0].shape and ty.shape == y[0].shape and ty.dtype == y.dtype
    assert set(np.unique(ty.numpy())) == {1, 2}  # label codes stay codes: no 0 padded in, no blend
    block = (ty == 2).numpy()
    js, is_ = np.flatnonzero(block.any(axis=(0, 2))), np.flatnonzero(block.any(axis=(0, 1)))
    assert len(js) == 8 and len(is_) == 20  # 20 (j) x 8 (i) became 8 (j) x 20 (i), about the centre
    assert (np.flatnonzero(block.any(axis=(1, 2))) == np.arange(8, 16)).all()  # k unchanged
    assert ((tx[0] > 0.5).numpy() == block).mean() > 0.99  # the image moved with its label
    # a turn that brings in what lay beyond the patch: the label there is background (code 1), the image 0
    tx, ty = turn(x[0], y[0], (np.pi / 4, 0.0, 0.0), 1.0, y_background=1)
    assert ty[:, 0, 0].eq(1).all() and tx[0, :, 0, 0].eq(0).all()
    ax, ay = batch_augment(x, y, {"spatial": {"probability": 1.0, "rotate_deg": 30, "scale": [0.9, 1.1]}},
                           np.random.default_rng(3), y_background=1)
    assert set(np.unique(ay.numpy())) <= {1, 2} and not torch.equal(ay, y)


def test_a_zoom_enlarges_the_anatomy_and_regions_labels_are_turned_too():
    x, y = _batch()
    regions = torch.stack([(y == 2), (y == 2)], dim=1).to(torch.float32)  # [B, R, ...]
    aug = {"spatial": {"probability": 1.0, "rotate_deg": 0, "scale": [1.5, 1.5]}}
    ax, ar = batch_augment(x, regions, aug, np.random.default_rng(0))
    assert ar.shape == regions.shape
    assert ar[:, 0].sum() > 1.8 * regions[:, 0].sum()  # 1.5**3 = 3.4 times the volume, less what leaves the patch
    assert set(np.unique(ar.numpy())) <= {0.0, 1.0}


def test_intensity_augmentations_change_only_the_image_and_are_reproducible():
    x, y = _batch()
    aug = {"noise": {"probability": 1.0, "sigma": 0.1}, "blur": {"probability": 1.0, "sigma_vox": [1.0, 1.0]},
           "low_resolution": {"probability": 1.0, "zoom": [0.5, 0.5]}, "gamma": {"probability": 1.0, "range": [2.0, 2.0]}}
    a = batch_augment(x, y, aug, np.random.default_rng(5))
    b = batch_augment(x, y, aug, np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], y)
    assert not torch.equal(a[0], x) and x.max() == 1.0  # the input batch is not changed
    blur_only = batch_augment(x, y, {"blur": {"probability": 1.0, "sigma_vox": [1.0, 1.0]}}, np.random.default_rng(0))[0]
    assert abs(blur_only.sum().item() - x.sum().item()) < 1e-2 * x.sum().item()  # a blur keeps the mean
    assert 0 < blur_only[0, 0, 7, 16, 16].item() < 0.5  # and softens the block's edge
    low = batch_augment(x, y, {"low_resolution": {"probability": 1.0, "zoom": [0.25, 0.25]}},
                        np.random.default_rng(0))[0]
    assert (low[0, 0] != x[0, 0]).any()
    never = batch_augment(x, y, {"noise": {"probability": 0.0, "sigma": 0.5}}, np.random.default_rng(0))[0]
    assert torch.equal(never, x)


@pytest.mark.parametrize("aug,message", [
    ({"spatial": {"probability": 2}}, "probability must be between 0 and 1"),
    ({"spatial": {"probability": 0.2, "scale": [1.2, 0.8]}}, "scale must be [low, high]"),
    ({"noise": {"probability": 0.1, "sigma": 3}}, "sigma must be between 0 and 1"),
    ({"gamma": {"probability": 0.1, "gama": [0.7, 1.5]}}, "an object with 'probability'"),
    ({"blur": {"sigma_vox": [0.5, 1]}}, "an object with 'probability'"),
])
def test_augmentations_that_cannot_run_are_refused(aug, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_batch_augment({"augment": aug, "bundle": {"segmentation": {"dims": 3}}})


def test_a_2d_model_refuses_them_and_training_checks_before_preparing_cases(tmp_path):
    with pytest.raises(InputError, match="augment.noise is for 3D models"):
        check_batch_augment({"augment": {"noise": {"probability": 0.1, "sigma": 0.1}},
                             "bundle": {"segmentation": {"dims": 2}}})
    from SegmentationDeepEditLib.cli import main
    from test_train_segment import _config

    cfg = _config(steps=2)
    cfg["augment"]["spatial"] = {"probability": 0.5, "rotate_deg": 400}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run")]) == 1
    assert not (tmp_path / "run").exists()


def test_a_run_with_every_augmentation_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """Drawn from the step's stream: a run interrupted and resumed equals an uninterrupted one."""
    import SegmentationDeepEditLib.train_segment as T
    from SegmentationDeepEditLib.bundle import load_bundle, load_network
    from test_train_segment import _config, _interrupt_at_step_25

    cfg = _config()
    cfg["augment"].update({"spatial": {"probability": 0.5, "rotate_deg": 15, "scale": [0.85, 1.25]},
                           "noise": {"probability": 0.3, "sigma": 0.1}, "blur": {"probability": 0.3, "sigma_vox": [0.5, 1.0]},
                           "low_resolution": {"probability": 0.3, "zoom": [0.5, 1.0]},
                           "gamma": {"probability": 0.3, "range": [0.7, 1.5]}})
    T.train_segmentation(cfg, tmp_path / "a", data_root=tmp_path, device="cpu", show_progress=False)
    _interrupt_at_step_25(cfg, tmp_path / "b", monkeypatch)
    T.train_segmentation(cfg, tmp_path / "b", data_root=tmp_path, device="cpu", show_progress=False, resume=True)
    wa = load_network(load_bundle(tmp_path / "a" / "bundle")).state_dict()
    wb = load_network(load_bundle(tmp_path / "b" / "bundle")).state_dict()
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-5, err_msg=k)
    plain = _config()
    T.train_segmentation(plain, tmp_path / "c", data_root=tmp_path, device="cpu", show_progress=False)
    wc = load_network(load_bundle(tmp_path / "c" / "bundle")).state_dict()
    assert any(not torch.allclose(wa[k], wc[k]) for k in wa)  # the augmentations did change the training
