"""The state of a batch run, kept in ``OUTPUT_DIR/manifest.json`` so that a killed run can resume.

A study is *done* only when its whole output folder was built in a temporary folder, moved
into place in one rename, and then recorded here with the size and SHA-256 of every file. On
``--resume``:

- temporary study folders left by a killed run (``.deepedit-tmp-*``) are deleted;
- a study recorded as done is kept only if its input fingerprint is unchanged and every output
  file is still there with its recorded size; otherwise it is redone;
- an output folder of a study that is not recorded as done (killed between the rename and the
  manifest update, or left from another run) is deleted and the study redone, so no
  half-checked output survives;
- failed and unfinished studies are redone.

Only the driver process writes the manifest (workers return their results to it), and every
write replaces the file atomically. A lock file (``.deepedit-batch.lock``: process id, host and
the run's token) keeps a second run out of a folder that a live run is writing; a killed run's
lock is taken over (also an empty or garbled one, as a kill while writing it leaves). A study task
moves its results in only while its run's token is in the lock (:meth:`Manifest.holds_lock`), so
tasks that outlive a killed driver write nothing unrecorded: the lock must hold their run's token and,
on the driver's machine, name a live process (a Dask worker on another machine cannot see that the
driver died; the resumed run takes the lock over, and redoes a study such a task wrote unrecorded).
``--resume`` on a folder that holds files but no manifest is refused (it is not a batch output).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ..errors import InputError
from .report import write_json

__all__ = ["Manifest", "MANIFEST_NAME", "TMP_PREFIX", "LOCK_NAME", "FORMAT", "study_fingerprint", "remove_tree"]

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".deepedit-batch.lock"
_LOCK_WRITE_S = 10.0  # an unreadable lock file younger than this may be being written by a starting run
TMP_PREFIX = ".deepedit-tmp-"
FORMAT = "deepedit-batch-manifest"
_VERSION = 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def study_fingerprint(files: Iterable[str], decisions: Any) -> str:
    """A cheap fingerprint of a study's inputs and plan: file paths, sizes and mtimes, plus the plan's choices."""
    h = hashlib.sha256()
    for f in sorted(files):
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    h.update(json.dumps(decisions, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_live_lock(folder: Path) -> None:
    """Raise when ``folder``'s lock file belongs to a live run (or one that may be writing it now)."""
    lock = Path(folder) / LOCK_NAME
    if not lock.exists():
        return
    try:
        pid_text, host = lock.read_text().split()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        # empty or garbled: a run killed between creating and writing it, unless that is happening now
        try:
            young = time.time() - lock.stat().st_mtime < _LOCK_WRITE_S
        except OSError:
            young = False
        pid, host = -1, socket.gethostname() if not young else ""
    alive = host != socket.gethostname() or (pid > 0 and _alive(pid))  # another machine's run: assume alive
    if alive:
        who = f"process {pid} on {host}" if pid > 0 else "one starting now: its lock file is being written"
        raise InputError(f"another batch run ({who}) is writing this folder; wait for it, "
                         f"or delete {LOCK_NAME} if it is gone", folder) from None


def remove_tree(path: Path) -> None:
    """Delete a folder we own: first renamed aside (so a half-deleted folder never keeps its name)."""
    p = Path(path)
    if not p.exists():
        return
    aside = p.with_name(f"{TMP_PREFIX}old-{p.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(p, aside)
    except OSError:
        aside = p
    shutil.rmtree(aside, ignore_errors=True)


class Manifest:
    """The manifest of one output folder.

    Attributes:
        path: ``OUTPUT_DIR/manifest.json``.
        data: the JSON content (``studies``: name -> state record).
    """

    def __init__(self, path: Path, data: Dict[str, Any]):
        self.path = Path(path)
        self.data = data
        self.token: Optional[str] = None  # this run's lock token (set when it takes the lock)

    # ------------------------------------------------------------------ opening

    @staticmethod
    def read_for_resume(output_dir: Path, *, input_dir: Path, options: Dict[str, Any]) -> Dict[str, Any]:
        """The manifest of ``output_dir`` (read only), when a run from ``input_dir`` with ``options``
        may continue it (also what ``--resume --dry-run`` checks).

        Raises:
            InputError: unreadable, not a batch manifest, another input folder, other options.
        """
        out = Path(output_dir)
        path = out / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"the manifest cannot be read ({e}); move it away to start over", path) from None
        if data.get("format") != FORMAT:
            raise InputError("not a deepedit batch manifest", path)
        if data.get("input") != str(input_dir):
            raise InputError(f"the run in this folder was made from another input folder ({data.get('input')})", out)
        old = data.get("options", {})
        diff = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
        if diff:
            def shown(k, v):  # what the user typed, not Python's None
                return ("the default (none given)" if k != "model" else "the default model") if v is None else repr(v)

            details = "; ".join(f"{k}: {shown(k, old.get(k))} then, {shown(k, options.get(k))} now" for k in diff)
            raise InputError(f"the run in this folder was made with other options ({details}); resume with the "
                             "same options or use a new output folder", out)
        return data

    @classmethod
    def open(cls, output_dir: Path, *, input_dir: Path, options: Dict[str, Any], resume: bool) -> "Manifest":
        """Open the manifest of ``output_dir`` for a run (creating the folder when needed).

        Raises:
            InputError: the folder holds something and ``resume`` is False; ``resume`` with
                a manifest made from another input folder or with other options; an
                unreadable manifest.
        """
        out = Path(output_dir)
        path = out / MANIFEST_NAME
        if out.exists() and not out.is_dir():
            raise InputError("the output path exists and is not a folder", out)
        if out.is_dir():
            _refuse_live_lock(out)  # a run writing it now: say so first (not "use --resume")
        holds_files = out.is_dir() and any(not p.name.startswith(TMP_PREFIX) and p.name != LOCK_NAME for p in out.iterdir())
        if not resume:
            if holds_files:
                what = "a batch run (manifest.json): use --resume to continue it" if path.exists() else "files:"
                raise InputError(f"the output folder already holds {what} or choose an empty or new folder", out)
        elif holds_files and not path.exists():
            # not a batch run's output (a mistyped -o): resuming would replace its study-named folders
            raise InputError("--resume: the output folder holds files but no batch run (no manifest.json); give the "
                             "folder of the run to continue, or an empty or new folder", out)
        if not out.parent.is_dir():
            raise InputError("the folder that should hold the output folder does not exist", out.parent)
        out.mkdir(exist_ok=True)
        if path.exists():
            data = cls.read_for_resume(out, input_dir=input_dir, options=options)
            data["resumed"] = data.get("resumed", 0) + 1
        else:
            data = {"format": FORMAT, "version": _VERSION, "input": str(input_dir), "options": options,
                    "created": _now(), "studies": {}}
        m = cls(path, data)
        m._lock()
        m.clean_temporary()
        return m

    # ------------------------------------------------------------------ one run per folder

    def _lock(self) -> None:
        """Take the folder's lock file; refuse when a live run on this machine holds it."""
        lock = self.path.parent / LOCK_NAME
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                _refuse_live_lock(self.path.parent)
                lock.unlink(missing_ok=True)  # left by a killed run
                continue
            self.token = uuid.uuid4().hex
            with os.fdopen(fd, "w") as f:
                f.write(f"{me} {self.token}\n")
            self._locked = True
            return

    @staticmethod
    def holds_lock(output_dir: Path, token: Optional[str]) -> bool:
        """True when the run with ``token`` still holds ``output_dir``'s lock (no token: not checked).

        A study task checks it before moving its results in: a task whose run was killed (kill -9
        of the driver) or taken over by a resumed run must not write unrecorded results.
        """
        if not token:
            return True
        try:
            fields = (Path(output_dir) / LOCK_NAME).read_text().split()
        except OSError:
            return False
        if fields[2:3] != [token]:
            return False
        # a driver killed with -9 leaves its lock as it was: on its own machine, check it still runs
        # (a Dask worker on another machine cannot; a resumed run takes the lock over there)
        return fields[1] != socket.gethostname() or (fields[0].isdigit() and _alive(int(fields[0])))

    def close(self) -> None:
        """Release the folder's lock."""
        if getattr(self, "_locked", False):
            if Manifest.holds_lock(self.path.parent, self.token):  # not a lock someone else took over meanwhile
                (self.path.parent / LOCK_NAME).unlink(missing_ok=True)
            self._locked = False

    def clean_temporary(self) -> List[str]:
        """Delete temporary study folders and files left by a killed run; returns their names."""
        removed = []
        for p in sorted(self.path.parent.iterdir()):
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(".") and ".tmp" in p.name and p.is_file()):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    # ------------------------------------------------------------------ states

    @property
    def studies(self) -> Dict[str, Dict[str, Any]]:
        return self.data.setdefault("studies", {})

    def state(self, name: str) -> str:
        return self.studies.get(name, {}).get("state", "pending")

    def is_done(self, name: str, fingerprint: str) -> bool:
        """True when the study is recorded as done for these inputs and all its outputs are intact."""
        rec = self.studies.get(name)
        if not rec or rec.get("state") != "done" or rec.get("fingerprint") != fingerprint:
            return False
        folder = self.path.parent / name
        for rel, info in rec.get("outputs", {}).items():
            p = folder / rel
            if not p.is_file() or p.stat().st_size != info.get("bytes"):
                return False
        return True

    def mark_running(self, name: str, fingerprint: str) -> None:
        rec = self.studies.setdefault(name, {})
        rec.update(state="running", fingerprint=fingerprint, started=_now())  # queued in this run
        rec.pop("error", None)

    def record(self, name: str, fingerprint: str, result: Dict[str, Any]) -> None:
        """Record a finished study (``result`` is :meth:`StudyResult.to_manifest`); ``attempts`` counts the
        times it was finished (done or failed), not the runs that queued it and were interrupted."""
        rec = self.studies.setdefault(name, {})
        rec.update(result)
        rec["attempts"] = rec.get("attempts", 0) + 1
        rec["fingerprint"] = fingerprint
        rec["finished"] = _now()

    def reset_unfinished(self) -> None:
        """Studies left "running" (interrupted) go back to "pending"."""
        for rec in self.studies.values():
            if rec.get("state") == "running":
                rec["state"] = "pending"

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.data, self.path, overwrite=True)
