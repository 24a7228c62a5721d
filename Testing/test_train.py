"""`deepedit train`: a short run learns (loss goes down), checkpoints, resumes, and writes a loadable bundle."""

import csv
import json

import numpy as np
import pytest
import torch

from SegmentationDeepEditLib.bundle import load_network, verify_bundle
from SegmentationDeepEditLib.cli import main
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.train import load_config

from test_bundle import tiny_meta


def _config():
    meta = tiny_meta("tiny-train")
    return {
        "seed": 3, "steps": 40, "batch_size": 2, "lr": 0.003, "loss": "dice_ce", "jitter_mm": 1.0,
        "val_every": 20, "checkpoint_every": 10,
        "data": [{"synthetic": "brain", "cases": 1, "seed": 5, "objects": [["tumour core", "t1c", [1, 4]]],
                  "options": {"spacing": 2.0, "oblique": False}}],
        "validation": [{"synthetic": "brain", "cases": 1, "seed": 5, "objects": [["tumour core", "t1c", [1, 4]]],
                  "options": {"spacing": 2.0, "oblique": False}}],
        "bundle": meta,
        "card": "# tiny-train\nA test bundle.\n",
    }


def _losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_short_training_learns_and_resumes(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_config()))
    run = tmp_path / "run"
    # first half, then resume to the end
    assert main(["train", str(cfg_path), "--run-dir", str(run), "--steps", "40", "--json"]) == 0
    losses = _losses(run)
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, f"loss did not go down: {losses}"
    ck = torch.load(str(run / "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert ck["step"] == 40
    info = verify_bundle(run / "bundle")
    assert info["id"] == "tiny-train"
    net = load_network(run / "bundle")
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k


def test_resume_continues_from_the_checkpoint_and_refuses_an_edited_config(tmp_path, capsys):
    cfg = _config()
    cfg["steps"] = 20
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "--run-dir", str(run), "--steps", "10", "--json"]) == 0
    assert torch.load(str(run / "checkpoint.pt"), weights_only=True)["step"] == 10
    before = (run / "checkpoint.pt").read_bytes()
    cfg_path.write_text(json.dumps(dict(cfg, lr=1.0)))  # an edited recipe would mix two runs in one network
    assert main(["train", str(cfg_path), "--run-dir", str(run), "--resume"]) == 1
    assert "cannot resume: this checkpoint was written by a run with another config 'lr'" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    cfg_path.write_text(json.dumps(cfg))  # the same recipe, longer (no schedule made for the length): continues
    assert main(["train", str(cfg_path), "--run-dir", str(run), "--resume", "--json"]) == 0
    assert torch.load(str(run / "checkpoint.pt"), weights_only=True)["step"] == 20
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_config()))
    assert main(["train", str(cfg_path), "--run-dir", str(tmp_path / "none"), "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err


def test_published_recipe_preset_is_valid_and_trains(shared_data, tmp_path):
    """The DExtr3D preset: schema-valid bundle, 2 channels, DiceLoss at lr 1e-4; two steps run on real data."""
    from pathlib import Path

    import jsonschema

    from SegmentationDeepEditLib.bundle import _schema
    from SegmentationDeepEditLib.train import load_config, train

    cfg = load_config(Path(__file__).resolve().parents[1] / "Resources" / "Training" / "dextr3d-recipe.json")
    jsonschema.validate(cfg["bundle"], _schema())
    assert cfg["loss"] == "dice" and cfg["lr"] == 1e-4 and cfg["bundle"]["network"]["args"]["in_channels"] == 2
    assert cfg["bundle"]["margin_vox"] == 20 and cfg["bundle"]["divisible_by"] == 32
    cfg["data"] = [d for d in cfg["data"] if "image" in d][:1]  # one real case keeps the test short
    cfg["validation"] = []
    cfg["bundle"]["roi_max"] = [64, 64, 64]
    out = train(cfg, tmp_path / "run", data_root=shared_data, device="cpu", steps=2, quiet=True)
    assert out["steps"] == 2 and (tmp_path / "run" / "bundle" / "model.safetensors").is_file()


def test_cases_generated_in_worker_processes_equal_the_serial_ones(tmp_path):
    from SegmentationDeepEditLib.train import build_cases

    import SimpleITK as sitk

    objects = [["tumour core", "t1c", [1, 4]], ["whole tumour", "flair", [1, 2, 4]]]
    sources = [{"synthetic": "brain", "cases": 2, "seed": 11, "objects": objects,
                "options": {"spacing": 3.0, "oblique": False}},
               {"synthetic": "ct", "cases": 1, "seed": 40, "objects": [["liver", "ct", [1, 2]]],
                "options": {"spacing": 4.0, "oblique": False}}]
    counted = []
    serial = build_cases(sources, tmp_path)
    parallel = build_cases(sources, tmp_path, progress=counted.append, workers=2)
    assert [c.name for c in parallel] == [c.name for c in serial] == [
        "synthetic-brain-11:tumour core@t1c", "synthetic-brain-11:whole tumour@flair",
        "synthetic-brain-12:tumour core@t1c", "synthetic-brain-12:whole tumour@flair",
        "synthetic-ct-40:liver@ct"]
    assert counted == [1, 1, 1]
    for a, b in zip(serial, parallel):
        assert list(a.objects) == list(b.objects)
        for x, y in zip(a.images + list(a.objects.values()), b.images + list(b.objects.values())):
            assert x.GetSize() == y.GetSize() and x.GetOrigin() == y.GetOrigin()
            assert x.GetDirection() == y.GetDirection() and x.GetSpacing() == y.GetSpacing()
            assert np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y))
    # the command line passes --workers to the annotation trainer too
    cfg = _config()
    del cfg["card"]  # no card in the config (as in the presets): the bundle gets a draft, and verifies
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["train", str(cfg_path), "--run-dir", str(tmp_path / "run"), "--steps", "2", "--workers", "2",
                 "--json"]) == 0
    assert len(_losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "bundle" / "README.md").read_text().startswith("# Model card (draft): tiny-train")
    assert verify_bundle(tmp_path / "run" / "bundle")["id"] == "tiny-train"


def test_a_config_extends_another_and_lays_its_keys_over_it(tmp_path):
    from SegmentationDeepEditLib.train import merge_config

    base = {"steps": 10, "augment": {"flip_axes": [0], "intensity_scale": 0.1}, "data": [{"a": 1}, {"b": 2}],
            "bundle": {"id": "x", "training": {"config": "base.json"}}, "snapshot_every": 5}
    over = {"augment": {"intensity_scale": 0.2, "noise": {"probability": 0.1}}, "data": [{"c": 3}],
            "bundle": {"training": {"config": "child.json"}}, "snapshot_every": None}
    merged = merge_config(base, over)
    assert merged == {"steps": 10, "augment": {"flip_axes": [0], "intensity_scale": 0.2, "noise": {"probability": 0.1}},
                      "data": [{"c": 3}], "bundle": {"id": "x", "training": {"config": "child.json"}}}
    assert base["augment"] == {"flip_axes": [0], "intensity_scale": 0.1}  # the base is not changed
    (tmp_path / "sub").mkdir()
    full = dict(_config(), bundle=dict(_config()["bundle"]))
    (tmp_path / "base.json").write_text(json.dumps(full))
    (tmp_path / "sub" / "mid.json").write_text(json.dumps({"extends": "../base.json", "steps": 7}))
    (tmp_path / "sub" / "child.json").write_text(json.dumps({"extends": "mid.json", "lr": 0.01}))
    cfg = load_config(tmp_path / "sub" / "child.json")
    assert cfg["steps"] == 7 and cfg["lr"] == 0.01 and cfg["data"] == full["data"] and "extends" not in cfg
    (tmp_path / "loop-a.json").write_text(json.dumps({"extends": "loop-b.json"}))
    (tmp_path / "loop-b.json").write_text(json.dumps({"extends": "loop-a.json"}))
    with pytest.raises(InputError, match="goes round in a circle"):
        load_config(tmp_path / "loop-a.json")
    (tmp_path / "orphan.json").write_text(json.dumps({"extends": "gone.json"}))
    with pytest.raises(InputError, match=r"orphan.json: 'extends': gone.json not found"):
        load_config(tmp_path / "orphan.json")
    (tmp_path / "odd.json").write_text(json.dumps({"extends": 3}))
    with pytest.raises(InputError, match="'extends' must name another training config file"):
        load_config(tmp_path / "odd.json")
    (tmp_path / "short.json").write_text(json.dumps({"extends": "base.json", "steps": 0}))
    with pytest.raises(InputError, match="'steps' must be a positive whole number"):  # checked after merging
        load_config(tmp_path / "short.json")
