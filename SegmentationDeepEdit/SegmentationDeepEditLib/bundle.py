"""Model bundles: ``<models dir>/<id>/`` with ``metadata.json``, weights and a model card.

- ``metadata.json`` is validated against ``schemas/bundle.schema.json``;
- the network is built from ``network.class``/``network.args`` with MONAI classes only;
- weights are safetensors (or a torch state dict read with ``weights_only=True``); their
  SHA-256 is checked against ``weights.sha256`` before anything is loaded;
- ``README.md`` is the model card.

Bundles are looked up in the folders of ``$DEEPEDIT_MODELS_DIR`` (os.pathsep-separated), then in
the repository's ``Resources/Models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import ModelError
from .jsonfile import read_json

__all__ = [
    "Bundle", "models_dirs", "list_bundles", "load_bundle", "verify_bundle", "build_network",
    "load_network", "get_network", "save_bundle", "draft_card", "sha256_of", "DEFAULT_ANNOTATION_MODEL", "CT_ANNOTATION_MODEL",
]

DEFAULT_ANNOTATION_MODEL = "deepedit-extreme-points"
#: Annotation model used instead of the default for CT images, when installed (see annotate.default_model_for)
CT_ANNOTATION_MODEL = "deepedit-extreme-points-ct"
_SCHEMA_PATH = Path(__file__).with_name("schemas") / "bundle.schema.json"
_REPO_MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"


@dataclass(frozen=True)
class Bundle:
    """A model bundle on disk: its folder and validated metadata."""

    path: Path
    meta: Dict[str, Any]

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def description(self) -> str:
        return self.meta["description"]

    @property
    def weight_files(self) -> List[Tuple[Path, str]]:
        """(path, SHA-256) of each weights file: one, or several shards (``weights`` a list) whose
        tensors together are the state dict (an ensemble keeps one member per file)."""
        w = self.meta["weights"]
        return [(self.path / e["file"], e["sha256"]) for e in (w if isinstance(w, list) else [w])]

    @property
    def weights_path(self) -> Path:
        """The weights file (the first shard of a sharded bundle)."""
        return self.weight_files[0][0]

    @property
    def weights_sha256(self) -> str:
        """One hash for all the weights: the file's, or of the shards' hashes in order."""
        files = self.weight_files
        if len(files) == 1:
            return files[0][1]
        return hashlib.sha256("".join(h for _, h in files).encode()).hexdigest()


def models_dirs() -> List[Path]:
    """Folders searched for bundles, in order."""
    dirs = [Path(p) for p in os.environ.get("DEEPEDIT_MODELS_DIR", "").split(os.pathsep) if p]
    dirs.append(_REPO_MODELS)
    return [d for d in dirs if d.is_dir()]


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))


def _read_meta(folder: Path) -> Dict[str, Any]:
    import jsonschema

    meta_path = folder / "metadata.json"
    meta = read_json(meta_path, "model bundle metadata.json", ModelError)
    try:
        jsonschema.validate(meta, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ModelError(f"invalid metadata at {where}: {e.message}", meta_path) from None
    seg = meta.get("segmentation") or {}
    fill, classes = seg.get("foreground_threshold_class"), len(seg.get("class_values") or ())
    if fill is not None and fill >= classes:
        raise ModelError(f"invalid metadata at segmentation/foreground_threshold_class: {fill} is not one of the "
                         f"{classes} classes of class_values", meta_path)
    grow = (seg.get("postprocess") or {}).get("grow")
    if grow is not None:
        if seg.get("output_kind") != "classes":
            raise ModelError("invalid metadata at segmentation/postprocess/grow: growth needs a classes output "
                             "(it reads p(background))", meta_path)
        if grow["value"] not in (seg.get("class_values") or [])[1:]:
            raise ModelError(f"invalid metadata at segmentation/postprocess/grow/value: {grow['value']} is not one of "
                             f"the non-background class_values {(seg.get('class_values') or [])[1:]}", meta_path)
    members = seg.get("fast_members")
    if members is not None:
        n = (meta.get("network") or {}).get("ensemble")
        if not n or not seg.get("fast_spacing_mm"):
            raise ModelError("invalid metadata at segmentation/fast_members: it names ensemble members for the fast "
                             "mode, so it needs network.ensemble and segmentation.fast_spacing_mm", meta_path)
        if max(members) > int(n):
            raise ModelError(f"invalid metadata at segmentation/fast_members: member {max(members)} does not exist "
                             f"(the ensemble's members are 1 to {n})", meta_path)
    return meta


def _declared_id(folder: Path) -> Optional[str]:
    """The id a bundle folder's metadata.json declares (read without validation), or None."""
    try:
        meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("id") if isinstance(meta, dict) else None


def list_bundles() -> List[Bundle]:
    """All valid bundles found (invalid ones are skipped; ``verify_bundle`` reports them)."""
    found: Dict[str, Bundle] = {}
    for d in models_dirs():
        for sub in sorted(d.iterdir()):
            if (sub / "metadata.json").is_file():
                try:
                    b = Bundle(sub, _read_meta(sub))
                except ModelError:
                    continue
                found.setdefault(b.id, b)
    return list(found.values())


def load_bundle(id_or_path: Union[str, Path, Bundle, None] = None) -> Bundle:
    """Find a bundle by id (or folder path); None means the default annotation model.

    Raises:
        ModelError: unknown id, missing or invalid metadata.
    """
    if isinstance(id_or_path, Bundle):
        return id_or_path
    key = str(id_or_path or DEFAULT_ANNOTATION_MODEL)
    p = Path(key)
    if p.is_dir():
        return Bundle(p.resolve(), _read_meta(p))
    dirs = models_dirs()
    for d in dirs:  # by id, the first models folder first: the bundle `deepedit models list` shows
        for sub in sorted(d.iterdir()):
            if _declared_id(sub) == key:
                try:
                    return Bundle(sub.resolve(), _read_meta(sub))
                except ModelError:
                    if any(b.id == key for b in list_bundles()):
                        continue  # an invalid copy: the valid one further on is the one listed
                    raise
    for d in dirs:  # a folder name that is no bundle's id (an invalid bundle reports its problem)
        if (d / key / "metadata.json").is_file():
            return Bundle((d / key).resolve(), _read_meta(d / key))
    known = ", ".join(b.id for b in list_bundles()) or "none"
    raise ModelError(f"unknown model {key!r} (installed: {known}; see `deepedit models list`)")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ensemble_class():
    import torch

    class MeanOfNetworks(torch.nn.Module):
        """Several networks of one architecture whose logits are averaged (a deep ensemble,
        Lakshminarayanan et al. 2017): called like one network. Its weights are those of every
        member, keyed ``members.<i>.<name>``, a file per member (:func:`ensemble_state_dict`)."""

        def __init__(self, members):
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x):
            # one member's activations at a time (memory as for one network); the sum in float32, also
            # under bf16 autocast, where adding six bf16 logits would round each partial sum
            out = self.members[0](x).float()
            for m in self.members[1:]:
                out = out + m(x).float()
            return out / len(self.members)

    return MeanOfNetworks


def ensemble_members(net, members: Optional[List[int]]):
    """The mean of some of an ensemble's members (numbered from 1; ``segmentation.fast_members``), sharing
    their weights with ``net``; ``net`` itself when ``members`` is None."""
    if members is None:
        return net
    return _ensemble_class()([net.members[i - 1] for i in members])


def one_network_meta(meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` for one member of its network: without ``network.ensemble`` (unchanged if it has none)."""
    return dict(meta, network={k: v for k, v in meta["network"].items() if k != "ensemble"})


def build_network(meta: Dict[str, Any]):
    """Build the (untrained) network a bundle declares: a MONAI class, or ``smp.<Class>`` from
    segmentation-models-pytorch (2D models; optional dependency, never with downloaded encoder
    weights). With ``network.ensemble`` = N (>= 2), N such networks whose logits are averaged."""
    n = meta["network"].get("ensemble")
    if n is not None:
        return _ensemble_class()([build_network(one_network_meta(meta)) for _ in range(int(n))])
    cls_name = meta["network"]["class"]
    args = dict(meta["network"]["args"])
    if cls_name.startswith("smp."):
        try:
            import segmentation_models_pytorch as smp
        except ImportError as e:
            raise ModelError(
                f"model {meta.get('id')!r} needs the optional package segmentation-models-pytorch ({e}); install it with "
                "`pip install 'segmentation-deepedit[2d]'` (it needs torchvision: on x86_64 "
                "`pip install torch==2.14.1 torchvision==0.29.1`)") from None
        cls = getattr(smp, cls_name[4:])
        args["encoder_weights"] = None  # never download pretrained encoder weights
    else:
        import monai.networks.nets as nets

        cls = getattr(nets, cls_name)
    try:
        return cls(**args)
    except TypeError as e:
        raise ModelError(f"cannot build {cls_name} from network.args: {e}") from None


def _read_state_dict(bundle: Bundle) -> Dict[str, Any]:
    state: Dict[str, Any] = {}
    for wp, expected in bundle.weight_files:  # every hash checked before its file is read
        if not wp.is_file():
            raise ModelError("weights file missing", wp)
        digest = sha256_of(wp)
        if digest != expected:
            raise ModelError(
                f"weights SHA-256 mismatch (file {digest[:12]}..., metadata {expected[:12]}...): "
                "the file is corrupt or was replaced; refusing to load it", wp)
        try:
            if wp.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(wp))
            else:
                import torch

                part = torch.load(str(wp), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
            raise ModelError(f"cannot read weights: {e}", wp) from None
        if set(part) & set(state):
            raise ModelError("weights shards repeat tensors of an earlier shard", wp)
        state.update(part)
    return state


def read_weights_for_init(source: Union[str, Path], member: Optional[int] = None) -> Dict[str, Any]:
    """The weights of a bundle id or folder, to start a training run from (``init_from``).

    Only the weights and their hash are checked, not the rest of the metadata: a run folder's
    bundle written under an older schema (e.g. bare terminology codes) still starts a run, whose
    own metadata comes from its config. Of an ensemble bundle (``network.ensemble``) one member is
    read, ``member`` (1 to N, as its files ``model-1.safetensors`` ... are numbered), as float32.
    """
    folder = Path(source)
    if not (folder / "metadata.json").is_file():
        b = load_bundle(str(source))
        folder, meta = b.path, b.meta
    else:
        meta = read_json(folder / "metadata.json", "model bundle metadata.json", ModelError)
    n = meta["network"].get("ensemble") if isinstance(meta.get("network"), dict) else None
    if n and member is None:
        raise ModelError(f"is an ensemble of {n} networks: a run starts from one network (name one with "
                         f"init_member / --init-member 1 to {n})", folder / "metadata.json")
    if member is not None and not (n and isinstance(member, int) and not isinstance(member, bool) and 1 <= member <= n):
        raise ModelError(f"init_member {member!r}: " + (f"this ensemble's members are 1 to {n}" if n else
                                                        "the bundle is one network, not an ensemble"),
                         folder / "metadata.json")
    entries = meta.get("weights") if isinstance(meta.get("weights"), list) else [meta.get("weights")]
    if not all(isinstance(e, dict) and "file" in e and "sha256" in e for e in entries):
        raise ModelError("metadata.json names no weights file and hash", folder / "metadata.json")
    state = _read_state_dict(Bundle(folder.resolve(), meta))
    if member is None:
        return state
    prefix = f"members.{member - 1}."
    return {k[len(prefix):]: (v.float() if v.is_floating_point() else v) for k, v in state.items() if k.startswith(prefix)}


def load_network(bundle: Union[str, Bundle, None], device: Any = "cpu"):
    """Verify the weights' hash, build the network, load the weights, move to ``device``, eval mode."""
    import torch

    b = load_bundle(bundle)
    net = build_network(b.meta)
    state = _read_state_dict(b)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights do not fit the network in metadata.json: {str(e).splitlines()[0]}", b.weights_path) from None
    net.eval()
    if b.meta["network"].get("channels_last") and torch.device(device).type == "cpu":
        net = net.to(memory_format=torch.channels_last_3d)
    return net.to(device)


_cache_lock = threading.Lock()
_cache: Dict[tuple, Any] = {}


def get_network(bundle: Union[str, Bundle, None], device: Any = "cpu"):
    """Like :func:`load_network`, but keeps loaded networks for warm re-use (keyed by weights hash and device)."""
    b = load_bundle(bundle)
    key = (str(b.path), b.weights_sha256, str(device))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_network(b, device)
        return _cache[key]


def verify_bundle(bundle: Union[str, Path, Bundle]) -> Dict[str, Any]:
    """Full check of a bundle: metadata schema, model card, weights hash, weights fit the network.

    Returns:
        A summary dict (id, version, parameters, weights size).

    Raises:
        ModelError: on the first problem found.
    """
    b = load_bundle(bundle)
    if not (b.path / "README.md").is_file():
        raise ModelError("model card README.md is missing", b.path)
    net = load_network(b, "cpu")
    n_params = sum(p.numel() for p in net.parameters())
    return {"id": b.id, "version": b.version, "task": b.task, "path": str(b.path),
            "parameters": n_params, "weights_bytes": sum(p.stat().st_size for p, _ in b.weight_files),
            "weights_files": len(b.weight_files), "sha256": b.weights_sha256}


def draft_card(meta: Dict[str, Any], config: Dict[str, Any], config_path: Optional[Path] = None) -> str:
    """A draft model card for a bundle a training run wrote without one: what it was trained on and how,
    and what is still to be written before it is shared (data licences, Dice on real data)."""
    lines = [f"# Model card (draft): {meta.get('id')} {meta.get('version', '')}".rstrip(), "",
             f"Written by `deepedit train{' ' + str(config_path) if config_path else ''}`"
             f" on {time.strftime('%Y-%m-%d')}: {config.get('steps')} steps, seed {config.get('seed', 0)}.", "",
             "## Training data", ""]
    for src in config.get("data", []):
        if "synthetic" in src:
            lines.append(f"- {src.get('cases')} generated {src['synthetic']} cases (seed {src.get('seed', 0)})")
        else:
            lines.append(f"- {src.get('image') or ', '.join(src.get('images', {}).values())} with label {src.get('label')}")
    lines += ["", "## Still to write before sharing", "",
              "- the licences of the real training data and what they allow for these weights;",
              "- Dice measured on real cases not used in training (`deepedit evaluate`), seconds and memory;",
              "- intended use and known weaknesses.", ""]
    return "\n".join(lines)


def ensemble_state_dict(members: List[Dict[str, Any]], dtype: Optional[str] = "float16") -> List[Dict[str, Any]]:
    """The weights of a ``network.ensemble`` bundle from its members' state dicts: one shard per member
    (keys ``members.<i>.<name>``; :func:`save_bundle` writes a file each), stored as ``dtype`` (float16
    halves the files; loading casts back to the network's float32). The members must have the same
    keys and shapes."""
    import torch

    if len(members) < 2:
        raise ModelError(f"an ensemble needs two or more networks, got {len(members)}")
    keys = list(members[0])
    shards = []
    for i, sd in enumerate(members):
        if set(sd) != set(keys) or any(sd[k].shape != members[0][k].shape for k in keys):  # order may differ
            raise ModelError(f"ensemble member {i} does not have the architecture of member 0")
        shards.append({f"members.{i}.{k}": (v.to(getattr(torch, dtype)) if dtype and v.is_floating_point() else v)
                       for k, v in ((k, sd[k].detach().cpu()) for k in keys)})
    return shards


def save_bundle(folder: Path, meta: Dict[str, Any], state_dict: Union[Dict[str, Any], List[Dict[str, Any]]],
                card: Optional[str] = None) -> Bundle:
    """Write a bundle: safetensors weights, their hash into metadata, metadata and card.

    ``state_dict`` is one dict (``model.safetensors``) or a list of them, written as shards
    ``model-1.safetensors``, ``model-2.safetensors``, ... (an ensemble: a few MB per file, not one large
    file). Used by training; writes each file through a temporary name then renames it.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(meta))
    parts = state_dict if isinstance(state_dict, list) else [state_dict]
    entries = []
    for i, part in enumerate(parts, 1):
        name = f"model-{i}.safetensors" if isinstance(state_dict, list) else "model.safetensors"
        tmp = folder / f".{name}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in part.items()}, str(tmp))
        entries.append({"file": name, "sha256": sha256_of(tmp)})
        os.replace(tmp, folder / name)
    meta["weights"] = entries if isinstance(state_dict, list) else entries[0]
    for name, text in (("metadata.json", json.dumps(meta, indent=2) + "\n"), ("README.md", card)):
        if text is None:
            continue
        t = folder / f".{name}.tmp"
        t.write_text(text, encoding="utf-8")
        os.replace(t, folder / name)
    return Bundle(folder.resolve(), _read_meta(folder))
