"""The persistent inference worker: the real process, a throwaway bundle, JSON lines both ways."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib import bundle as B
from SegmentationDeepEditLib.points import extreme_points_from_mask
from SegmentationDeepEditLib.worker import Worker, WorkerClient, WorkerError, write_exchange_image

MODULE_DIR = Path(__file__).resolve().parents[1] / "SegmentationDeepEdit"


def _meta(model_id: str, task: str = "annotation", channels=("extreme", "positive", "negative")) -> dict:
    meta = {
        "id": model_id, "name": model_id, "version": "0.0.1", "task": task, "description": "throwaway test bundle",
        "network": {"class": "SegResNet", "args": {"spatial_dims": 3, "in_channels": 1 + len(channels), "out_channels": 1,
                                                    "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}},
        "inputs": [{"name": "image", "modality": "any", "normalization": "zscore"}],
        "spacing_mm": [1.0, 1.0, 1.0], "roi_max": [32, 32, 32], "margin_vox": 4, "divisible_by": 16,
        "labels": [{"value": 1, "name": "Object", "color": [1, 0.5, 0]}],
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "weights": {"file": "model.safetensors", "sha256": "0" * 64},
        "training": {}, "license": "Apache-2.0",
    }
    if channels:
        meta["guidance"] = {"type": "gaussian_points", "sigma_mm": 3.0, "channels": list(channels)}
    if task == "segmentation":
        meta["inputs"] = [{"name": "t1c", "modality": "MR", "normalization": "zscore"},
                          {"name": "flair", "modality": "MR", "normalization": "zscore"}]
        meta["network"]["args"]["in_channels"] = 2
        meta["segmentation"] = {"dims": 3, "reference": "t1c", "crop": {"kind": "nonzero"}, "roi": [32, 32, 32],
                                "output_kind": "regions", "paint": [{"channel": 0, "value": 1}],
                                "output_convention": "binary"}
    return meta


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for meta in (_meta("throwaway-clicks"), _meta("throwaway-auto", task="segmentation", channels=())):
        net = B.build_network(meta)
        B.save_bundle(root / meta["id"], meta, net.state_dict(), "# throwaway\n")
    return root


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    env = dict(os.environ)
    env["DEEPEDIT_MODELS_DIR"] = str(models_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    c = WorkerClient([sys.executable, "-m", "SegmentationDeepEditLib.worker"], cwd=str(MODULE_DIR), env=env,
                     scratch_parent=str(tmp_path_factory.mktemp("scratch")))
    c.start()
    yield c
    c.close()


def _oblique_image():
    """A 40x36x30 oblique, anisotropic image with a bright ellipsoid, and the ellipsoid's mask."""
    size = (40, 36, 30)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    inside = ((i - 20) / 9.0) ** 2 + ((j - 17) / 7.0) ** 2 + ((k - 14) / 6.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    arr = (100 + 400 * inside + rng.normal(0, 10, inside.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.9123456789, 1.1, 1.3))
    image.SetOrigin((12.345678901, -40.0, 7.25))
    image.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix())
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def _messages_until_reply(c: WorkerClient, rid, timeout=60.0):
    seen = []
    reply = c.wait(rid, timeout=timeout, on_message=seen.append)
    return reply, seen


def test_ready_and_ping(client):
    pong = client.request("ping", timeout=60)
    assert pong["pid"] == client.pid and pong["protocol"] == 1


def test_annotate_round_trip_keeps_geometry_and_model(client):
    image, mask = _oblique_image()
    path = write_exchange_image(image, client.scratch / "image.mha")
    points = extreme_points_from_mask(mask)

    t0 = time.perf_counter()
    rid = client.send("annotate", images=[str(path)], points=points.tolist(), model="throwaway-clicks",
                      device="cpu", output=str(client.scratch / "mask1.mha"))
    first, seen = _messages_until_reply(client, rid)
    cold = time.perf_counter() - t0
    assert "result" in first, first
    r = first["result"]
    assert [m["stage"] for m in seen if m.get("id") == rid and "progress" in m][-1] == "done"
    out = sitk.ReadImage(r["mask"])
    # exactly the input geometry: bit for bit
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8
    assert r["model_id"] == "throwaway-clicks" and r["device"] == "cpu" and r["segment_name"] == "Object"
    assert r["color"] == [1.0, 0.5, 0.0] and r["model_loaded"] is True and r["images_cached"] is False
    assert set(r["seconds"]) >= {"read", "prepare", "inference", "postprocess", "write", "request"}
    assert r["voxels"] == int(sitk.GetArrayViewFromImage(out).sum())

    # second click on the same image: model and image are reused, and it is faster
    t1 = time.perf_counter()
    second = client.request("annotate", timeout=60, images=[str(path)], points=(points + 0.5).tolist(),
                            positive=[points.mean(axis=0).tolist()], negative=[], model="throwaway-clicks",
                            device="cpu", output=str(client.scratch / "mask2.mha"))
    warm = time.perf_counter() - t1
    assert second["model_loaded"] is False and second["images_cached"] is True
    assert warm < cold, f"warm request {warm:.2f} s not faster than cold {cold:.2f} s"


def test_error_reply_keeps_the_worker_alive(client):
    image, mask = _oblique_image()
    path = write_exchange_image(image, client.scratch / "image-err.mha")
    five = extreme_points_from_mask(mask)[:5]
    rid = client.send("annotate", images=[str(path)], points=five.tolist(), model="throwaway-clicks", device="cpu")
    reply = client.wait(rid, timeout=60)
    assert "exactly 6 points" in reply["error"] and reply["type"] == "InputError"
    with pytest.raises(WorkerError, match="unknown model 'no-such-model'"):
        client.request("annotate", timeout=60, images=[str(path)], points=extreme_points_from_mask(mask).tolist(),
                       model="no-such-model")
    with pytest.raises(WorkerError, match="does not exist"):
        client.request("annotate", timeout=60, image=str(client.scratch / "missing.mha"), points=five.tolist())
    assert client.request("ping", timeout=30)["pid"] == client.pid  # same process


def test_segment_request_runs_an_automatic_model(client):
    img, _ = _oblique_image()
    a = write_exchange_image(img, client.scratch / "t1c.mha")
    b = write_exchange_image(img, client.scratch / "flair.mha")
    with pytest.raises(WorkerError, match="'t1c' and 'flair' are the same image"):
        client.request("segment", timeout=60, model="throwaway-auto", inputs={"t1c": str(a), "flair": str(b)})
    b = write_exchange_image(sitk.Cast(img, sitk.sitkFloat32) * 0.5 + 3.0, client.scratch / "flair.mha")
    reply = client.request("segment", timeout=120, model="throwaway-auto", inputs={"t1c": str(a), "flair": str(b)},
                           device="cpu", tta=0)
    label = sitk.ReadImage(reply["label"])
    assert label.GetSize() == img.GetSize() and np.allclose(label.GetDirection(), img.GetDirection())
    assert reply["model_id"] == "throwaway-auto" and reply["segments"][0]["name"] == "Object"
    assert set(reply["seconds"]) >= {"prepare", "inference", "total", "read"}
    with pytest.raises(WorkerError, match="needs input"):
        client.request("segment", timeout=60, model="throwaway-auto", inputs={"t1c": str(a)})
    with pytest.raises(WorkerError, match="not an automatic"):
        client.request("segment", timeout=60, model="throwaway-clicks", inputs={})


# --- in-process protocol checks (no subprocess) ---------------------------------------------------


def _worker(tmp_path):
    sent = []
    return Worker(sent.append, scratch=tmp_path), sent


def test_bad_lines_and_unknown_requests_get_error_replies(tmp_path):
    w, sent = _worker(tmp_path)
    w.handle_line("not json\n")
    w.handle_line("[1, 2]\n")
    w.handle_line(json.dumps({"id": 7, "op": "fly"}))
    w.handle_line("   \n")
    assert [m.get("id") for m in sent] == [None, None, 7]
    assert "not valid JSON" in sent[0]["error"] and "JSON object" in sent[1]["error"]
    assert "unknown request 'fly'" in sent[2]["error"] and "annotate" in sent[2]["error"]
    w.handle({"id": 8, "op": "shutdown"})
    assert sent[-1] == {"id": 8, "result": {"pid": os.getpid()}} and not w.running


def test_kill_and_close_clean_up(models_dir, tmp_path):
    env = dict(os.environ, DEEPEDIT_MODELS_DIR=str(models_dir))
    c = WorkerClient([sys.executable, "-m", "SegmentationDeepEditLib.worker"], cwd=str(MODULE_DIR), env=env,
                     scratch_parent=str(tmp_path))
    c.start()
    scratch = c.scratch
    assert scratch.is_dir()
    c.kill()
    assert not c.running
    deadline = time.monotonic() + 10
    items = []
    while not any("exited" in m for m in items) and time.monotonic() < deadline:
        items += c.poll()
        time.sleep(0.02)
    assert any("exited" in m for m in items)
    with pytest.raises(WorkerError, match="not running"):
        c.send("ping")
    c.close()
    assert not scratch.exists()


def test_unnamed_outputs_go_to_the_client_scratch_and_go_with_it_after_a_kill(models_dir, tmp_path):
    # The Slicer module names no output path; Cancel kills the worker. Its results (full-size label
    # maps of patient images) must not outlive the kill in a folder of the worker's own.
    env = dict(os.environ, DEEPEDIT_MODELS_DIR=str(models_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    c = WorkerClient([sys.executable, "-m", "SegmentationDeepEditLib.worker"], cwd=str(MODULE_DIR), env=env,
                     scratch_parent=str(tmp_path / "client"))
    (tmp_path / "client").mkdir()
    (tmp_path / "tmp").mkdir()
    c.env["TMPDIR"] = str(tmp_path / "tmp")  # where a folder of the worker's own would go
    c.start()
    image, mask = _oblique_image()
    path = write_exchange_image(image, c.scratch / "image.mha")
    r = c.request("annotate", timeout=60, images=[str(path)], points=extreme_points_from_mask(mask).tolist(),
                  model="throwaway-clicks", device="cpu")
    assert Path(r["mask"]).parent == c.scratch and Path(r["mask"]).is_file()
    assert list((tmp_path / "tmp").iterdir()) == []  # no folder of its own
    c.kill()
    c.close()
    assert list((tmp_path / "client").iterdir()) == []


def test_demo_request_writes_a_generated_case(client, tmp_path):
    pytest.importorskip("nilearn")
    r = client.request("demo", timeout=120, kind="brain", seed=3, spacing=2.0, output_dir=str(tmp_path))
    assert set(r["images"]) == {"t1", "t1c", "t2", "flair"} and r["main"] == "t1c"
    t1c, truth = sitk.ReadImage(r["images"]["t1c"]), sitk.ReadImage(r["truth"])
    assert t1c.GetSpacing() == truth.GetSpacing() and t1c.GetSize() == truth.GetSize()
    assert sitk.GetArrayViewFromImage(truth).sum() > 0
    points = np.asarray(r["truth_extreme_points"])
    assert points.shape == (6, 3)
    np.testing.assert_allclose(points, extreme_points_from_mask(truth), atol=1e-6)
    with pytest.raises(WorkerError, match="does not exist"):
        client.request("demo", timeout=30, output_dir=str(tmp_path / "missing"))


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_kill_with_process_group_ends_the_processes_the_worker_started(tmp_path):
    """Cancel of a batch run with several study processes: none of them may live on and write."""
    # a stand-in worker that starts a child (as a batch run's process pool does), then waits
    script = tmp_path / "fake_worker.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")
    c = WorkerClient([sys.executable, str(script)], scratch_parent=str(tmp_path), process_group=True)
    c.start()
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(child, 0)  # alive
    c.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
            stat = Path(f"/proc/{child}/stat")
            if stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z":
                break  # ended; only its exit status is left for whoever adopted it
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the worker's child process survived kill()")
    c.close()
