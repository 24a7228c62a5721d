"""Join several trained networks of one recipe into one ensemble bundle (``network.ensemble``).

The bundle's network is the mean of its members' logits; its weights are all members' in one
safetensors file (float16 by default: half the size; loading casts back to float32). Metadata and
model card come from a base bundle (id or folder), so the inference settings are the base's;
``--version`` and ``--config`` say what is new.

Run (liver-lesion 0.2.0, from the six runs of liver-lesion-all-real.json):
    python Resources/Training/assemble_ensemble.py --base liver-lesion --version 0.2.0 \\
        --config Resources/Training/liver-lesion-all-real.json -o out/liver-lesion \\
        runs/lar-20261126/bundle/model.safetensors runs/lar-1/bundle/model.safetensors ...
(a member may be a run's bundle/model.safetensors or one of its snapshots).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file

from SegmentationDeepEditLib.bundle import build_network, ensemble_state_dict, load_bundle, save_bundle
from SegmentationDeepEditLib.errors import ModelError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", help="the members' .safetensors weight files, in order")
    ap.add_argument("--base", required=True, help="bundle id or folder whose metadata and card the ensemble takes")
    ap.add_argument("--version", required=True, help="the new bundle's version")
    ap.add_argument("--config", help="training config of the members (recorded in metadata.training)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored precision (default float16)")
    ap.add_argument("-o", "--output", required=True, help="new bundle folder (must not exist)")
    args = ap.parse_args(argv)
    out = Path(args.output)
    if out.exists():
        print(f"error: {out}: already exists; choose a new folder", file=sys.stderr)
        return 1
    base = load_bundle(args.base)
    single = {k: v for k, v in base.meta["network"].items() if k != "ensemble"}
    members = []
    for f in args.members:
        sd = load_file(f)
        try:
            build_network(dict(base.meta, network=single)).load_state_dict(sd, strict=True)
        except RuntimeError as e:
            print(f"error: {f}: does not fit {base.id}'s network: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        members.append(sd)
    try:
        state = ensemble_state_dict(members, args.dtype)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = json.loads(json.dumps(base.meta))
    meta["network"] = dict(single, ensemble=len(members))
    meta["version"] = args.version
    meta.pop("weights", None)
    training = {"members": [str(f) for f in args.members], "stored_as": args.dtype}
    if args.config:
        training["config"] = args.config
    meta["training"] = training
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_bundle(tmp, meta, state, (base.path / "README.md").read_text(encoding="utf-8"))
        load_bundle(str(tmp))  # schema check before it is renamed in
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out} ({len(members)} networks, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
