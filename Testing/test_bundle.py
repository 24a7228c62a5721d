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
        # a few MB per network (the project's rule for weights in the repository); an ensemble's file holds
        # several, a file each (liver-lesion 0.3.0: nine of 3.5 MB in float16), and no bundle passes 35 MB in all
        networks = b.meta["network"].get("ensemble", 1)
        assert info["weights_bytes"] / networks < 8e6, f"{b.id}: weights too large for the repository"
        assert info["weights_bytes"] < 35e6, f"{b.id}: weights too large for the repository"
        assert all(p.stat().st_size < 8e6 for p, _ in b.weight_files), f"{b.id}: a weights file over 8 MB"


def test_label_terminology_must_be_a_full_slicer_entry(tiny_bundle):
    meta = json.loads((tiny_bundle.path / "metadata.json").read_text())
    meta["labels"][0]["terminology"] = "SCT^10200004^Liver"  # a bare code: Slicer cannot parse it as a tag
    (tiny_bundle.path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="terminology"):
        B.load_bundle(tiny_bundle.path)


def _members(meta, n):
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        nets.append(B.build_network(meta).eval())
    return nets


def test_an_ensemble_bundle_is_the_mean_of_its_networks_logits(tmp_path):
    meta = tiny_meta("tiny-ensemble")
    members = _members(meta, 3)
    ens_meta = dict(meta, network=dict(meta["network"], ensemble=3))
    for dtype, tol in (("float32", 1e-6), ("float16", 2e-2)):
        state = B.ensemble_state_dict([m.state_dict() for m in members], dtype)
        assert {str(v.dtype) for shard in state for v in shard.values()} == {f"torch.{dtype}"}
        b = B.save_bundle(tmp_path / dtype, ens_meta, state, "# ensemble\n")
        # one file per member, each with its own hash in metadata.json
        assert [p.name for p, _ in b.weight_files] == ["model-1.safetensors", "model-2.safetensors", "model-3.safetensors"]
        net = B.load_network(b)
        assert all(p.dtype == torch.float32 for p in net.parameters())  # stored halves are cast back on loading
        x = torch.randn(1, 2, 16, 16, 16)
        with torch.no_grad():
            want = sum(m(x) for m in members) / 3
            got = net(x)
            assert not torch.allclose(members[0](x), want, atol=1e-3)  # the members differ: a real mean
        assert torch.allclose(got, want, atol=tol), (dtype, (got - want).abs().max())
        assert B.verify_bundle(b.path)["parameters"] == 3 * sum(p.numel() for p in members[0].parameters())
    # fp16 storage halves the files
    assert B.verify_bundle(tmp_path / "float16")["weights_bytes"] < 0.6 * B.verify_bundle(tmp_path / "float32")["weights_bytes"]
    # a shard whose hash does not match is refused before anything is read
    shard = tmp_path / "float16" / "model-2.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256 mismatch") as e:
        B.load_network(tmp_path / "float16")
    assert "model-2.safetensors" in str(e.value)


def test_ensemble_errors(tmp_path):
    meta = tiny_meta("tiny-ensemble")
    a, b = _members(meta, 2)
    with pytest.raises(ModelError, match="two or more"):
        B.ensemble_state_dict([a.state_dict()])
    other = B.build_network(dict(meta, network=dict(meta["network"], args=dict(meta["network"]["args"], init_filters=16))))
    with pytest.raises(ModelError, match="member 1 does not have the architecture"):
        B.ensemble_state_dict([a.state_dict(), other.state_dict()])
    # a bundle that says one network is refused by the schema
    state = B.ensemble_state_dict([a.state_dict(), b.state_dict()])
    with pytest.raises(ModelError, match="network/ensemble: 1 is less than the minimum of 2"):
        B.save_bundle(tmp_path / "one", dict(meta, network=dict(meta["network"], ensemble=1)), state, "# x\n")
    # weights of two networks under metadata that declares three do not load
    B.save_bundle(tmp_path / "three", dict(meta, network=dict(meta["network"], ensemble=3)), state, "# x\n")
    with pytest.raises(ModelError, match="do not fit"):
        B.load_network(str(tmp_path / "three"))


def _assemble():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "Resources" / "Training" / "assemble_ensemble.py"
    spec = importlib.util.spec_from_file_location("assemble_ensemble_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_assemble_ensemble_joins_trained_networks_into_a_bundle(tiny_bundle, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    main = _assemble()
    files = []
    for i, net in enumerate(_members(tiny_meta(), 2)):
        files.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, files[-1])
    out = tmp_path / "ens"
    assert main(["--base", str(tiny_bundle.path), "--version", "0.2.0", "-o", str(out)] + files) == 0
    b = B.load_bundle(str(out))
    assert b.version == "0.2.0" and b.meta["network"]["ensemble"] == 2 and b.meta["training"]["stored_as"] == "float16"
    assert (out / "README.md").read_text() == (tiny_bundle.path / "README.md").read_text()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        want = sum(m(x) for m in _members(tiny_meta(), 2)) / 2
        assert torch.allclose(B.load_network(b)(x), want, atol=2e-2)
    # an existing output, or a member of another architecture: exit 1, nothing written
    assert main(["--base", str(tiny_bundle.path), "--version", "0.2.1", "-o", str(out)] + files) == 1
    assert "already exists" in capsys.readouterr().err
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(3)}, str(odd))
    assert main(["--base", str(tiny_bundle.path), "--version", "0.2.1", "-o", str(tmp_path / "e2"), files[0], str(odd)]) == 1
    assert "odd.safetensors: does not fit" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "m0.safetensors", "m1.safetensors", "odd.safetensors", "tiny-test"]
    # an ensemble bundle's member files are members too (one network each): re-joined, the same network
    again = tmp_path / "again"
    assert main(["--base", str(out), "--version", "0.2.1", "-o", str(again), str(out / "model-2.safetensors"),
                 str(out / "model-1.safetensors"), files[0]]) == 0
    with torch.no_grad():
        want = (2 * B.load_network(b)(x) + _members(tiny_meta(), 1)[0](x)) / 3
        assert torch.allclose(B.load_network(B.load_bundle(str(again)))(x), want, atol=2e-2)
    save_file({**load_file(str(out / "model-1.safetensors")), **load_file(str(out / "model-2.safetensors"))},
              str(tmp_path / "both.safetensors"))
    for bad, said in (([files[0], files[0]], "given twice"), ([files[0], str(tmp_path / "gone.safetensors")], "gone.safetensors: cannot read"),
                      ([files[0], str(tmp_path / "both.safetensors")], "both.safetensors: holds the weights of several networks")):
        assert main(["--base", str(tiny_bundle.path), "--version", "0.2.1", "-o", str(tmp_path / "e3")] + bad) == 1
        assert said in capsys.readouterr().err
    assert main(["--base", str(tiny_bundle.path), "--version", "9.9", "-o", str(tmp_path / "e3")] + files) == 1
    assert "use MAJOR.MINOR.PATCH" in capsys.readouterr().err
    assert main(["--base", "no-such-model", "--version", "0.2.1", "-o", str(tmp_path / "e3")] + files) == 1
    assert "--base no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "e3").exists()


def test_a_training_run_cannot_start_from_an_ensemble():
    assert B.load_bundle("liver-lesion").meta["network"]["ensemble"] == 9  # the shipped liver model (0.3.0)
    with pytest.raises(ModelError, match="is an ensemble of 9 networks: a run starts from one network"):
        B.read_weights_for_init("liver-lesion")


def test_foreground_threshold_class_must_name_a_class_and_needs_the_threshold(tmp_path):
    import shutil

    folder = tmp_path / "liver-copy"
    shutil.copytree(B.load_bundle("liver-lesion").path, folder)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["segmentation"]["foreground_threshold_class"] = 1
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="foreground_threshold"):  # the class without the threshold
        B.load_bundle(folder)
    meta["segmentation"]["foreground_threshold"] = 0.4
    meta["segmentation"]["foreground_threshold_class"] = 3
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="foreground_threshold_class: 3 is not one of the 3 classes"):
        B.load_bundle(folder)
    meta["segmentation"]["foreground_threshold_class"] = 1
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert B.load_bundle(folder).meta["segmentation"]["foreground_threshold_class"] == 1


def test_grow_must_give_a_class_of_a_classes_output(tmp_path):
    import shutil

    folder = tmp_path / "liver-copy"
    shutil.copytree(B.load_bundle("liver-lesion").path, folder)
    meta = json.loads((folder / "metadata.json").read_text())
    for grow, message in (({"value": 3, "threshold": 0.3}, "grow/value: 3 is not one of the non-background class_values"),
                          ({"value": 0, "threshold": 0.3}, "postprocess/grow/value"),
                          ({"value": 1, "threshold": 1.2}, "postprocess/grow/threshold"),
                          ({"threshold": 0.3}, "'value' is a required property")):
        meta["segmentation"]["postprocess"]["grow"] = grow
        (folder / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(ModelError, match=message):
            B.load_bundle(folder)
    meta["segmentation"]["postprocess"]["grow"] = {"value": 1, "threshold": 0.3}
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert B.load_bundle(folder).meta["segmentation"]["postprocess"]["grow"]["threshold"] == 0.3
    glioma = tmp_path / "glioma-copy"
    shutil.copytree(B.load_bundle("glioma-regions").path, glioma)
    meta = json.loads((glioma / "metadata.json").read_text())
    meta["segmentation"].setdefault("postprocess", {})["grow"] = {"value": 1, "threshold": 0.3}
    (glioma / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="growth needs a classes output"):
        B.load_bundle(glioma)


def test_a_run_starts_from_one_member_of_an_ensemble():
    from safetensors.torch import load_file

    b = B.load_bundle("liver-lesion")
    n = b.meta["network"]["ensemble"]
    with pytest.raises(ModelError, match=f"init_member / --init-member 1 to {n}"):
        B.read_weights_for_init("liver-lesion")
    state = B.read_weights_for_init("liver-lesion", 2)
    net = B.build_network(B.one_network_meta(b.meta))
    net.load_state_dict(state, strict=True)  # exactly one network's tensors
    shard = load_file(str(b.path / "model-2.safetensors"))
    key = next(iter(state))
    assert state[key].dtype == torch.float32 and torch.equal(state[key], shard[f"members.1.{key}"].float())
    assert not torch.equal(state[key], B.read_weights_for_init("liver-lesion", 1)[key])
    for bad in (0, n + 1):
        with pytest.raises(ModelError, match=f"members are 1 to {n}"):
            B.read_weights_for_init("liver-lesion", bad)
    with pytest.raises(ModelError, match="one network, not an ensemble"):
        B.read_weights_for_init("glioma-regions", 1)
