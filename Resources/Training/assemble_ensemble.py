"""Join several trained networks of one recipe into one ensemble bundle (``network.ensemble``).

The bundle's network is the mean of its members' logits; its weights are all members' in one
safetensors file (float16 by default: half the size; loading casts back to float32). Metadata and
model card come from a base bundle (id or folder), so the inference settings are the base's;
``--version`` and ``--config`` say what is new.

Run (liver-lesion 0.2.0, from the six runs of liver-lesion-all-real.json; 0.3.0 in the liver card):
    python Resources/Training/assemble_ensemble.py --base liver-lesion --version 0.2.0 \\
        --config Resources/Training/liver-lesion-all-real.json -o out/liver-lesion \\
        runs/lar-20261126/bundle/model.safetensors runs/lar-1/bundle/model.safetensors ...
(a member may be a run's bundle/model.safetensors, one of its snapshots, or one member file of an ensemble
bundle, e.g. Resources/Models/liver-lesion/model-3.safetensors).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import uuid
from pathlib import Path

from safetensors.torch import load_file

from SegmentationDeepEditLib.bundle import build_network, ensemble_state_dict, load_bundle, one_network_meta, save_bundle
from SegmentationDeepEditLib.errors import DeepEditError, ModelError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", help="the members' .safetensors weight files, in order")
    ap.add_argument("--base", required=True, help="bundle id or folder whose metadata and card the ensemble takes")
    ap.add_argument("--version", required=True, help="the new bundle's version")
    ap.add_argument("--config", help="training config of the members (recorded in metadata.training)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored precision (default float16)")
    ap.add_argument("--fast-members", help="members (numbered from 1, in the order given) whose mean the fast mode runs, "
                    "e.g. 1-6 or 1,3,5 (segmentation.fast_members; default: all members in both modes, whatever the base says)")
    ap.add_argument("-o", "--output", required=True, help="new bundle folder (must not exist)")
    args = ap.parse_args(argv)
    try:
        return _assemble(args)
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


class _Refused(Exception):
    """A bad input: one line on stderr, exit 1, nothing written."""


def _member(path: str, base) -> dict:
    try:
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not a safetensors file
        raise _Refused(f"{path}: cannot read it as a safetensors weights file ({type(e).__name__}: {e})") from None
    shard = {k.split(".", 2)[1] for k in sd if k.startswith("members.")}
    if shard:  # one file of an ensemble bundle: members.<i>.<name>, one member per file as save_bundle writes
        if len(shard) > 1 or not all(k.startswith("members.") for k in sd):
            raise _Refused(f"{path}: holds the weights of several networks (members {sorted(shard)}); "
                           "give one network per file")
        i = next(iter(shard))
        sd = {k[len(f"members.{i}."):]: v for k, v in sd.items()}
    missing, unexpected = build_network(one_network_meta(base.meta)).load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise _Refused(f"{path}: does not fit {base.id}'s network ({len(missing)} missing, e.g. "
                       f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    return sd


def _member_numbers(text: str, n: int) -> list:
    """'1-6' or '1,3,5' -> [1, ...]: member numbers from 1 to n, each once."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        if not m:
            raise _Refused(f"--fast-members {text!r}: write member numbers like 1-6 or 1,3,5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(lo, hi + 1))
    if not out or min(out) < 1 or max(out) > n or len(set(out)) < len(out):
        raise _Refused(f"--fast-members {text!r}: the members are 1 to {n}, each named once")
    return out


def _assemble(args) -> int:
    out = Path(args.output)
    if out.exists():
        raise _Refused(f"{out}: already exists; choose a new folder")
    if not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", args.version):
        raise _Refused(f"--version {args.version!r}: use MAJOR.MINOR.PATCH, e.g. 0.2.0")
    if len(args.members) < 2 or len(args.members) > 16:
        raise _Refused(f"an ensemble bundle holds 2 to 16 networks, not {len(args.members)}")
    same = {Path(f).resolve() for f in args.members}
    if len(same) < len(args.members):
        raise _Refused("a member file is given twice; each network once")
    try:
        base = load_bundle(args.base)
    except DeepEditError as e:
        raise _Refused(f"--base {args.base}: {e}") from None
    members = [_member(f, base) for f in args.members]
    try:
        state = ensemble_state_dict(members, args.dtype)
    except ModelError as e:
        raise _Refused(str(e)) from None
    meta = json.loads(json.dumps(base.meta))
    meta["network"] = dict(one_network_meta(base.meta)["network"], ensemble=len(members))
    meta["version"] = args.version
    seg = meta.get("segmentation")
    if isinstance(seg, dict):
        seg.pop("fast_members", None)  # the base's members are not these
        if args.fast_members:
            seg["fast_members"] = _member_numbers(args.fast_members, len(members))
    elif args.fast_members:
        raise _Refused(f"--fast-members: {base.id} is not a segmentation model (it has no fast mode)")
    meta.pop("weights", None)
    training = {"members": [str(f) for f in args.members], "stored_as": args.dtype}
    if args.config:
        training["config"] = args.config
    meta["training"] = training
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")  # renamed in only when complete
    try:
        save_bundle(tmp, meta, state, (base.path / "README.md").read_text(encoding="utf-8"))
        load_bundle(str(tmp))  # schema check before it is renamed in
        tmp.rename(out)
    except DeepEditError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _Refused(f"the new bundle does not check: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out} ({len(members)} networks, {args.dtype})")
    print(f"note: its model card (README.md) and description are {base.id} {base.version}'s: rewrite them to say "
          "what this ensemble was trained on and what it measured", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
