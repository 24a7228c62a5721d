"""Model bundles: schema, hash check before loading, list/verify."""

import json

import pytest
import torch

from SegmentationDeepEditLib import bundle as B
from SegmentationDeepEditLib.errors import ModelError


def tiny_meta(model_id="tiny-test"):
    return {
        "id": model_id, "name": "tiny", "version": "0.0.1", "task": "annotation", "description": "test bundle",
        "network": {"class": "SegResNet", "args": {"spatial_dims": 3, "in_channels": 2, "out_channels": 1, "init_filters": 8,
                                                    "blocks_down": [1, 1], "blocks_up": [1]}},
        "inputs": [{"name": "image", "modality": "any", "normalization": "zscore"}],
        "guidance": {"type": "gaussian_points", "sigma_mm": 3.0, "channels": ["extreme"]},
        "spacing_mm": [1.0, 1.0, 1.0], "roi_max": [32, 32, 32], "margin_vox": 4, "divisible_by": 16,
        "labels": [{"value": 1, "name": "Object", "color": [1, 0, 0]}],
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "weights": {"file": "model.safetensors", "sha256": "0" * 64},
        "training": {}, "license": "Apache-2.0",
    }


@pytest.fixture
def tiny_bundle(tmp_path):
    meta = tiny_meta()
    torch.manual_seed(0)
    net = B.build_network(meta)
    return B.save_bundle(tmp_path / "tiny-test", meta, net.state_dict(), "# tiny test bundle\n")


def test_saved_bundle_verifies_and_loads(tiny_bundle):
    info = B.verify_bundle(tiny_bundle.path)
    assert info["id"] == "tiny-test" and info["parameters"] > 0
    assert len(info["sha256"]) == 64 and info["sha256"] == B.sha256_of(tiny_bundle.weights_path)
    net = B.load_network(tiny_bundle)
    assert not net.training


def test_corrupt_weights_are_refused_before_loading(tiny_bundle, monkeypatch):
    data = bytearray(tiny_bundle.weights_path.read_bytes())
    data[-10] ^= 0xFF
    tiny_bundle.weights_path.write_bytes(bytes(data))
    called = []
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: called.append(1))
    with pytest.raises(ModelError, match="SHA-256 mismatch") as e:
        B.load_network(tiny_bundle.path)
    assert "model.safetensors" in str(e.value)
    assert not called, "the weights were read although their hash is wrong"


def test_metadata_schema_errors_name_the_field(tiny_bundle):
    meta = json.loads((tiny_bundle.path / "metadata.json").read_text())
    meta["network"]["class"] = "os.system"
    (tiny_bundle.path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="network/class"):
        B.load_bundle(tiny_bundle.path)


def test_missing_model_card_fails_verify(tiny_bundle):
    (tiny_bundle.path / "README.md").unlink()
    with pytest.raises(ModelError, match="model card"):
        B.verify_bundle(tiny_bundle.path)


def test_weights_that_do_not_fit_the_network(tiny_bundle, tmp_path):
    meta = tiny_meta()
    meta["network"]["args"]["init_filters"] = 16
    other = B.save_bundle(tmp_path / "other", meta, B.build_network(meta).state_dict(), "card")
    (other.path / "model.safetensors").write_bytes(tiny_bundle.weights_path.read_bytes())
    m = json.loads((other.path / "metadata.json").read_text())
    m["weights"]["sha256"] = B.sha256_of(other.path / "model.safetensors")
    (other.path / "metadata.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="do not fit"):
        B.load_network(other.path)


def test_models_dir_env_lists_and_finds_bundles(tiny_bundle, monkeypatch):
    monkeypatch.setenv("DEEPEDIT_MODELS_DIR", str(tiny_bundle.path.parent))
    ids = [b.id for b in B.list_bundles()]
    assert "tiny-test" in ids
    assert B.load_bundle("tiny-test").path == tiny_bundle.path
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        B.load_bundle("nope")


def test_a_user_bundle_in_a_folder_named_other_than_its_id_overrides_the_shipped_one(tmp_path, monkeypatch, capsys):
    """`models list` went by id and found the user's bundle, while `annotate`, `verify` and every other command went
    by folder name first and used the shipped one."""
    from SegmentationDeepEditLib.cli import main

    meta = tiny_meta(B.DEFAULT_ANNOTATION_MODEL)
    user = B.save_bundle(tmp_path / "models" / "my-retrained", meta, B.build_network(meta).state_dict(), "# card\n")
    monkeypatch.setenv("DEEPEDIT_MODELS_DIR", str(tmp_path / "models"))
    listed = {b.id: b.path for b in B.list_bundles()}
    assert listed[B.DEFAULT_ANNOTATION_MODEL] == user.path
    assert B.load_bundle(B.DEFAULT_ANNOTATION_MODEL).path == user.path == B.load_bundle(None).path
    assert main(["models", "verify", B.DEFAULT_ANNOTATION_MODEL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"][0]["sha256"] == B.sha256_of(user.weights_path)
    # a bundle without a model card fails verify, and the others are still checked and reported
    (user.path / "README.md").unlink()
    assert main(["models", "verify"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "liver-lesion" in captured.out and " ok " in captured.out
    assert "1 of 5 bundle(s) failed verification" in captured.err and "model card README.md is missing" in captured.err


def test_a_trained_bundle_without_a_card_in_its_config_gets_a_draft_card(tmp_path):
    meta = tiny_meta("drafted")
    config = {"steps": 3, "seed": 4, "data": [{"synthetic": "brain", "cases": 2, "seed": 9},
                                              {"image": "a/t1c.nii.gz", "label": "a/seg.nii.gz"}]}
    card = B.draft_card(meta, config)
    assert card.startswith("# Model card (draft): drafted 0.0.1") and "3 steps, seed 4" in card
    assert "2 generated brain cases (seed 9)" in card and "a/t1c.nii.gz with label a/seg.nii.gz" in card
    assert "licences of the real training data" in card


def test_bundled_models_verify():
    bundles = B.list_bundles()
    assert any(b.id == B.DEFAULT_ANNOTATION_MODEL for b in bundles), "the default annotation model is not bundled"
    for b in bundles:
        info = B.verify_bundle(b)
        assert info["weights_bytes"] < 20e6, f"{b.id}: weights too large for the repository"


def test_label_terminology_must_be_a_full_slicer_entry(tiny_bundle):
    meta = json.loads((tiny_bundle.path / "metadata.json").read_text())
    meta["labels"][0]["terminology"] = "SCT^10200004^Liver"  # a bare code: Slicer cannot parse it as a tag
    (tiny_bundle.path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="terminology"):
        B.load_bundle(tiny_bundle.path)
