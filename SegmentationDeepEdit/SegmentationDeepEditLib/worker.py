"""A persistent inference worker, and the client that drives it.

The worker is a plain Python process (no Slicer): ``python -m SegmentationDeepEditLib.worker``.
It keeps networks loaded between requests (:func:`bundle.get_network` caches them) and the
last images it read, so the second click on the same volume costs only the network's forward
pass. The Slicer module talks to it through :class:`WorkerClient`, whose reader threads never
block the caller; scripts and tests can use the blocking :meth:`WorkerClient.request`.

Protocol: one JSON object per line, UTF-8, on stdin (requests) and stdout (messages).

Requests carry ``"op"`` and an ``"id"`` (any JSON scalar) that every message about them repeats:

- ``{"op": "ping"}`` -> ``{"pid", "python", "protocol"}``
- ``{"op": "load", "model", "device"}`` -> loads the network ahead of use -> ``{"model_id", "device", "seconds"}``
- ``{"op": "annotate", "images": [path, ...] (or "image": path), "points": [[x, y, z] x 6],
  "positive": [[x, y, z], ...], "negative": [...], "model", "device", "tta", "output": path}``
  -> ``{"mask": path, "model_id", "model_version", "segment_name", "color", "terminology",
  "device", "seconds": {...}, "warnings": [...], "voxels", "volume_ml", "model_loaded", "images_cached"}``
- ``{"op": "segment", "model", "inputs": {name: path}, "device", "tta", "fast", "output"}``
  -> ``{"label": path, "model_id", "model_version", "segments": [{value, name, color, terminology}],
  "regions": [{name, values, color}], "device", "tta", "fast", "seconds", "warnings", "volumes_ml"}``
- ``{"op": "demo", "kind": "brain", "seed", "output_dir"}`` -> a generated case written as files
- ``{"op": "batch_plan", "input_dir", "reference", "mapping"}`` -> what ``deepedit batch --dry-run`` finds:
  ``{"plans": [StudyPlan.to_dict()], "rows": [study table rows], "text", "exit_code"}``
- ``{"op": "batch", "input_dir", "output_dir", "model", "workers", "scheduler", "resume", "reference",
  "device", "spacing_mm", "mapping"}`` -> runs :func:`batch.run.run_batch` (the code ``deepedit batch`` runs),
  with a progress message after each study -> ``{"exit_code", "counts", "studies", "plans", "rows", "output",
  "text"}``. Cancel = end the worker: the manifest then says which studies ``resume`` must finish.
- ``{"op": "shutdown"}`` -> replies, then exits 0 (so does end of input)

Messages: ``{"ready": true, "pid", "protocol"}`` once at start (``id`` null);
``{"id", "progress": fraction 0..1, "stage": name}`` while working; then exactly one of
``{"id", "result": {...}}`` or ``{"id", "error": message, "type": error class}``. An error never
ends the worker. Points are LPS millimetres. Images travel as files: MetaImage ``.mha``, which
keeps spacing, origin and direction bit for bit (NRRD stores spacing times direction, and the
round trip can differ in the last bit). Log lines go to stderr; stdout carries only messages.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

__all__ = [
    "PROTOCOL", "EXCHANGE_SUFFIX", "SEGMENT_NOT_AVAILABLE", "WorkerError", "Worker", "WorkerClient",
    "write_exchange_image", "main",
]

PROTOCOL = 1
EXCHANGE_SUFFIX = ".mha"
SEGMENT_NOT_AVAILABLE = "this version cannot run automatic models yet"
_IMAGE_CACHE_SIZE = 4

log = logging.getLogger("SegmentationDeepEditLib.worker")


class WorkerError(RuntimeError):
    """A request failed in the worker (its message is the worker's), or the worker is not running."""


def write_exchange_image(image, path) -> Path:
    """Write an image for the other side, uncompressed (fast) and atomically (never half-written)."""
    import SimpleITK as sitk

    from .imageio import atomic_output

    out = Path(path)
    with atomic_output(out, overwrite=True) as tmp:
        sitk.WriteImage(image, str(tmp), False)
    return out


# --------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------


def _points(value, what: str, required: bool = False):
    import numpy as np

    from .errors import InputError

    if value is None or (not required and len(value) == 0):
        if required:
            raise InputError(f"the request has no {what} points")
        return None
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{what} points are not numbers") from None
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{what} points must be a list of [x, y, z] (LPS mm); got shape {list(arr.shape)}")
    return arr


#: Environment variable through which the client gives the worker process its scratch folder.
SCRATCH_ENV = "DEEPEDIT_WORKER_SCRATCH"


class Worker:
    """Serves requests (one at a time) and writes messages through ``emit``.

    Args:
        emit: called with each message (a dict) to send.
        scratch: folder for outputs a request does not name; removed by :meth:`close`.
    """

    def __init__(self, emit: Callable[[Dict[str, Any]], None], scratch: Optional[Path] = None):
        self._emit = emit
        self._own_scratch = scratch is None
        self.scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="deepedit-worker-"))
        self._images: "OrderedDict[Tuple[str, int, int], Any]" = OrderedDict()
        self._loaded: set = set()
        self._counter = itertools.count(1)
        self.running = True

    def close(self) -> None:
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- plumbing ----------------------------------------------------------------------

    def handle_line(self, line: str) -> None:
        """Parse one request line and answer it; never raises."""
        line = line.strip()
        if not line:
            return
        try:
            request = json.loads(line)
        except ValueError as e:
            self._emit({"id": None, "error": f"a request line is not valid JSON ({e})", "type": "ProtocolError"})
            return
        if not isinstance(request, dict):
            self._emit({"id": None, "error": "a request must be a JSON object", "type": "ProtocolError"})
            return
        self.handle(request)

    def handle(self, request: Dict[str, Any]) -> None:
        """Answer one request with a result or an error message; never raises."""
        rid = request.get("id")
        op = request.get("op")
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join(sorted(n[4:] for n in dir(self) if n.startswith("_op_")))
            self._emit({"id": rid, "error": f"unknown request {op!r} (known: {known})", "type": "ProtocolError"})
            return
        t0 = time.perf_counter()
        try:
            result = handler(request, lambda stage, fraction: self._emit(
                {"id": rid, "progress": round(float(fraction), 3), "stage": stage}))
        except MemoryError:
            self._emit({"id": rid, "error": "out of memory", "type": "MemoryError"})
            return
        except Exception as e:  # noqa: BLE001 - every failure becomes a reply; the worker lives on
            from .errors import DeepEditError

            if isinstance(e, DeepEditError):
                message = str(e)
            else:
                message = f"{type(e).__name__}: {e}"
                log.error("request %s (%s) failed:\n%s", rid, op, traceback.format_exc())
            self._emit({"id": rid, "error": message, "type": type(e).__name__})
            return
        if isinstance(result, dict) and "seconds" in result and isinstance(result["seconds"], dict):
            result["seconds"]["request"] = time.perf_counter() - t0
        self._emit({"id": rid, "result": result})

    def _read(self, path: str, what: str):
        """Read an input image, keeping the last few in memory (keyed by path, size and mtime)."""
        from .imageio import read_image

        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            from .errors import InputError

            raise InputError(f"the {what} file does not exist", p) from None
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key], True
        image = read_image(p, what=what)
        self._images[key] = image
        while len(self._images) > _IMAGE_CACHE_SIZE:
            self._images.popitem(last=False)
        return image, False

    def _output(self, request: Dict[str, Any], stem: str) -> Path:
        out = request.get("output")
        return Path(out) if out else self.scratch / f"{stem}-{next(self._counter)}{EXCHANGE_SUFFIX}"

    def _network(self, model, device: str) -> Tuple[Any, Any, bool]:
        """Load (or reuse) a bundle's network on the device ``auto``/``cpu``/``cuda`` resolves to.

        Returns:
            (bundle, torch device, True when this call had to load the network).
        """
        from .bundle import get_network, load_bundle
        from .device import pick_device

        b = load_bundle(model)
        dev = pick_device(device)
        key = (str(b.path), b.weights_sha256, str(dev))
        loaded_now = key not in self._loaded
        get_network(b, dev)
        self._loaded.add(key)
        return b, dev, loaded_now

    # -- requests ----------------------------------------------------------------------

    def _op_ping(self, request, progress):
        return {"pid": os.getpid(), "python": sys.version.split()[0], "protocol": PROTOCOL}

    def _op_shutdown(self, request, progress):
        self.running = False
        return {"pid": os.getpid()}

    def _op_load(self, request, progress):
        t0 = time.perf_counter()
        b, dev, loaded_now = self._network(request.get("model") or None, request.get("device") or "auto")
        return {"model_id": b.id, "device": dev.type, "model_loaded": loaded_now,
                "seconds": {"load": time.perf_counter() - t0}}

    def _op_annotate(self, request, progress):
        import numpy as np
        import SimpleITK as sitk

        from .annotate import annotate
        from .errors import InputError
        from .slicer_bridge import terminology_of_label

        t0 = time.perf_counter()
        paths = request.get("images") or ([request["image"]] if request.get("image") else [])
        if not paths:
            raise InputError("the request names no image")
        progress("read", 0.02)
        images, cached = [], []
        for n, path in enumerate(paths):
            image, was_cached = self._read(path, "image" if n == 0 else f"input image {n + 1}")
            images.append(image)
            cached.append(was_cached)
        t_read = time.perf_counter() - t0
        points = _points(request.get("points"), "extreme", required=True)
        positive = _points(request.get("positive"), "positive")
        negative = _points(request.get("negative"), "negative")
        model = request.get("model") or None
        device = request.get("device") or "auto"
        b, _, loaded_now = self._network(model, device)
        result = annotate(images, points, b, device=device, tta=bool(request.get("tta")),
                          positive=positive, negative=negative, progress=progress)
        t_write = time.perf_counter()
        out = write_exchange_image(result.mask, self._output(request, "mask"))
        seconds = dict(result.seconds)
        seconds.update(read=t_read, write=time.perf_counter() - t_write)
        voxels = int(sitk.GetArrayViewFromImage(result.mask).sum())
        return {
            "mask": str(out), "model_id": result.model_id, "model_version": result.model_version,
            "segment_name": result.segment_name, "color": [float(c) for c in result.color],
            "terminology": terminology_of_label(b.meta["labels"][0]), "device": result.device,
            "seconds": seconds, "warnings": list(result.warnings), "voxels": voxels,
            "volume_ml": voxels * float(np.prod(result.mask.GetSpacing())) / 1000.0,
            "model_loaded": loaded_now, "images_cached": all(cached),
        }

    def _op_segment(self, request, progress):
        from .bundle import load_bundle
        from .errors import InputError

        model = request.get("model")
        if not model:
            raise InputError("the request names no automatic model")
        b = load_bundle(model)
        if b.task != "segmentation":
            raise InputError(f"model {b.id!r} is an {b.task} model, not an automatic (segmentation) model")
        inputs = request.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise InputError("'inputs' must map input names to image files")
        from .segment import resolve_input_names, segment_images

        t0 = time.perf_counter()
        progress("read", 0.02)
        named, _ = resolve_input_names(b.meta, [(n, p) for n, p in inputs.items() if p])
        images = {}
        for name, path in named.items():
            images[name], _ = self._read(path, f"input {name}")
        t_read = time.perf_counter() - t0
        device = request.get("device") or "auto"
        tta = request.get("tta")
        result = segment_images(b, images, device=device, tta=None if tta is None else int(tta),
                                fast=bool(request.get("fast")), sources={k: str(v) for k, v in inputs.items() if v},
                                progress=progress)
        t_write = time.perf_counter()
        out = write_exchange_image(result.label, self._output(request, "label"))
        seconds = dict(result.seconds)
        seconds.update(read=t_read, write=time.perf_counter() - t_write)
        return {
            "label": str(out), "model_id": result.model_id, "model_version": result.model_version,
            "segments": [{"value": int(s["value"]), "name": s["name"], "color": [float(c) for c in s["color"]],
                          "terminology": s.get("terminology")} for s in result.segments],
            "regions": [{"name": r["name"], "values": [int(v) for v in r["values"]],
                         "color": [float(c) for c in r["color"]]} for r in result.regions],
            "device": result.device, "tta": result.tta, "fast": result.fast, "seconds": seconds,
            "warnings": list(result.warnings), "volumes_ml": result.volumes_ml(),
        }

    @staticmethod
    def _batch_options(request: Dict[str, Any]):
        from .batch.run import BatchOptions
        from .errors import InputError

        reference = request.get("reference") or ["t1c"]
        if isinstance(reference, str):
            reference = [r.strip() for r in reference.split(",") if r.strip()]
        kw: Dict[str, Any] = {"reference": tuple(reference), "model": request.get("model") or None,
                              "device": request.get("device") or "auto"}
        if "spacing_mm" in request:
            try:
                kw["spacing_mm"] = None if request["spacing_mm"] is None else float(request["spacing_mm"])
            except (TypeError, ValueError):
                raise InputError(f"spacing_mm must be a number, not {request['spacing_mm']!r}") from None
        return BatchOptions(**kw)

    @staticmethod
    def _folder(request: Dict[str, Any], key: str, what: str) -> Path:
        from .errors import InputError

        value = request.get(key)
        if not value:
            raise InputError(f"choose the {what}")
        return Path(value)

    def _op_batch_plan(self, request, progress):
        from .batch.report import format_plans, table_rows
        from .batch.run import run_batch

        mapping = request.get("mapping") or None
        result = run_batch(self._folder(request, "input_dir", "folder of studies"), None,
                           options=self._batch_options(request), dry_run=True,
                           mapping_file=Path(mapping) if mapping else None)
        plans = [p.to_dict() for p in result.plans]
        return {"plans": plans, "rows": table_rows(plans), "text": format_plans(result.plans, result.without_images),
                "exit_code": result.exit_code}

    def _op_batch(self, request, progress):
        from .batch.report import format_result, table_rows
        from .batch.run import run_batch
        from .errors import InputError

        try:
            workers = int(request.get("workers") or 1)
        except (TypeError, ValueError):
            raise InputError(f"workers must be a whole number, not {request.get('workers')!r}") from None
        mapping = request.get("mapping") or None
        out = self._folder(request, "output_dir", "output folder")
        result = run_batch(self._folder(request, "input_dir", "folder of studies"), out,
                           options=self._batch_options(request), workers=workers,
                           scheduler=request.get("scheduler") or None, resume=bool(request.get("resume")),
                           mapping_file=Path(mapping) if mapping else None, progress=progress)
        d = result.to_dict()
        d["rows"] = table_rows(d["plans"], result.output_dir)
        d["text"] = format_result(result)
        return d

    def _op_demo(self, request, progress):
        from .errors import InputError
        from .points import extreme_points_from_mask
        from .synthetic import make_brain_case, make_ct_case, tumour_core_mask

        kind = request.get("kind") or "brain"
        if kind not in ("brain", "ct"):
            raise InputError(f"unknown demo kind {kind!r} (brain or ct)")
        out_dir = Path(request.get("output_dir") or self.scratch)
        if not out_dir.is_dir():
            raise InputError("the output folder does not exist", out_dir)
        seed = int(request.get("seed", 7))
        kwargs = {k: request[k] for k in ("spacing", "size_mm") if request.get(k) is not None}
        progress("generate", 0.05)
        t0 = time.perf_counter()
        case = (make_brain_case if kind == "brain" else make_ct_case)(seed, **kwargs)
        truth = tumour_core_mask(case.label, kind)
        progress("write", 0.9)
        images = {}
        for name, image in case.images.items():
            images[name] = str(write_exchange_image(image, out_dir / f"demo-{kind}-{seed}-{name}{EXCHANGE_SUFFIX}"))
        truth_path = write_exchange_image(truth, out_dir / f"demo-{kind}-{seed}-truth{EXCHANGE_SUFFIX}")
        main_image = "t1c" if kind == "brain" else "ct"
        return {"kind": kind, "seed": seed, "images": images, "main": main_image, "truth": str(truth_path),
                "truth_extreme_points": extreme_points_from_mask(truth).tolist(),
                "seconds": {"generate": time.perf_counter() - t0}}


def _serve(stdin: TextIO, out: TextIO) -> int:
    lock = threading.Lock()

    def emit(message: Dict[str, Any]) -> None:
        text = json.dumps(message, allow_nan=False, default=str)
        with lock:
            out.write(text + "\n")
            out.flush()

    # outputs a request does not name go into the client's scratch folder, which the client removes
    # even when it had to kill this process (our own folder would outlive a kill)
    given = os.environ.get(SCRATCH_ENV, "")
    worker = Worker(emit, scratch=Path(given) if given and Path(given).is_dir() else None)
    try:
        emit({"id": None, "ready": True, "pid": os.getpid(), "protocol": PROTOCOL})
        for line in stdin:
            worker.handle_line(line)
            if not worker.running:
                break
    finally:
        worker.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m SegmentationDeepEditLib.worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m SegmentationDeepEditLib.worker",
        description="Persistent inference worker: JSON-lines requests on stdin, messages on stdout.",
        epilog='Example: echo \'{"id": 1, "op": "ping"}\' | python -m SegmentationDeepEditLib.worker')
    parser.add_argument("--log-level", default="INFO", help="logging level of the stderr log (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # stdout carries messages only: keep a private handle on it, then point file descriptor 1
    # (and sys.stdout) at stderr, so that a library printing to stdout cannot corrupt a message.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", newline="\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), "r", encoding="utf-8", closefd=False)
    return _serve(stdin, out)


# --------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------


class WorkerClient:
    """Starts the worker process and exchanges messages with it without ever blocking on it.

    Two reader threads turn the worker's stdout (messages) and stderr (log lines) into items
    of one queue; :meth:`poll` drains it, so a GUI timer can call it. The client owns a scratch
    folder for the files it exchanges, removed by :meth:`close`.

    Args:
        command: the program and arguments that start the worker, e.g.
            ``[python, "-m", "SegmentationDeepEditLib.worker"]``.
        cwd: its working folder (``python -m`` finds the package there).
        env: its environment (None: this process's).
        scratch_parent: where to make the scratch folder (None: the system's temporary folder).
        process_group: start the worker in a process group of its own, so that :meth:`kill` also
            ends the processes it started (a batch run with several worker processes). POSIX only;
            on Windows only the worker itself is ended.

    Queue items returned by :meth:`poll`: the worker's messages (dicts with ``id`` and one of
    ``ready``, ``progress``, ``result``, ``error``), ``{"log": line}`` for a stderr line, and
    ``{"exited": returncode}`` once the process has ended.
    """

    def __init__(self, command: Sequence[str], *, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 scratch_parent: Optional[str] = None, process_group: bool = False):
        self.command = list(command)
        self.process_group = bool(process_group) and os.name == "posix"
        self.cwd = cwd
        self.env = env
        self._scratch_parent = scratch_parent
        self.scratch: Optional[Path] = None
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._threads: List[threading.Thread] = []

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the worker (a no-op when it is running)."""
        if self.running:
            return
        if self.scratch is None or not self.scratch.is_dir():
            self.scratch = Path(tempfile.mkdtemp(prefix="deepedit-", dir=self._scratch_parent))
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window pops up
        if self.process_group:
            kwargs["start_new_session"] = True
        self._queue = queue.Queue()
        env = dict(self.env if self.env is not None else os.environ, **{SCRATCH_ENV: str(self.scratch)})
        proc = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=self.cwd, env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._proc = proc
        self._threads = [
            threading.Thread(target=self._read_messages, args=(proc, self._queue), daemon=True, name="deepedit-worker-out"),
            threading.Thread(target=self._read_log, args=(proc, self._queue), daemon=True, name="deepedit-worker-err"),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read_messages(proc: subprocess.Popen, q: "queue.Queue") -> None:
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            q.put(message if isinstance(message, dict) else {"log": line})
        q.put({"exited": proc.wait()})

    @staticmethod
    def _read_log(proc: subprocess.Popen, q: "queue.Queue") -> None:
        for line in proc.stderr:
            if line.strip():
                q.put({"log": line.rstrip()})

    def send(self, op: str, **fields: Any) -> int:
        """Send a request; returns its id. Starts nothing: call :meth:`start` first.

        Raises:
            WorkerError: the worker is not running.
        """
        if not self.running:
            raise WorkerError("the inference worker is not running")
        rid = next(self._ids)
        text = json.dumps({"id": rid, "op": op, **fields}, allow_nan=False)
        with self._write_lock:
            try:
                self._proc.stdin.write(text + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as e:
                raise WorkerError(f"the inference worker stopped ({e})") from None
        return rid

    def poll(self) -> List[Dict[str, Any]]:
        """Every message and log line received since the last call (never blocks)."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def wait(self, request_id: int, timeout: Optional[float] = None,
             on_message: Optional[Callable[[Dict[str, Any]], None]] = None,
             idle: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
        """Block until the request's result or error arrives; returns that message.

        Args:
            on_message: called with every other item meanwhile (progress, logs, other replies).
            idle: called about every 20 ms while waiting (a GUI can process its events there).

        Raises:
            WorkerError: the worker exited first, or ``timeout`` seconds passed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=0.02)
            except queue.Empty:
                item = None
            if item is not None:
                if item.get("id") == request_id and ("result" in item or "error" in item):
                    return item
                if "exited" in item:
                    raise WorkerError(f"the inference worker exited (code {item['exited']}) before answering")
                if on_message is not None:
                    on_message(item)
            if idle is not None:
                idle()
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"no answer from the inference worker within {timeout:g} s")

    def request(self, op: str, timeout: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
        """Send a request and wait for its result (blocking; for scripts and tests).

        Raises:
            WorkerError: the worker replied with an error (its message), or stopped.
        """
        reply = self.wait(self.send(op, **fields), timeout=timeout)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply["result"]

    def kill(self) -> None:
        """Stop the worker at once (Cancel): the request in progress is abandoned."""
        if self._proc is not None and self._proc.poll() is None:
            if self.process_group:
                import signal

                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except OSError:
                    self._proc.kill()
            else:
                self._proc.kill()
            self._proc.wait()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit, kill it if it does not, and remove the scratch folder."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                self.send("shutdown")
                proc.stdin.close()
                proc.wait(timeout=timeout)
            except (WorkerError, OSError, subprocess.TimeoutExpired):
                self.kill()
        for t in self._threads:
            t.join(timeout=1.0)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self._proc = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def __enter__(self) -> "WorkerClient":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
