"""The segmentation step of a batch study, as a pluggable function.

A study's registered volumes (all on one grid) go in; a label map with segment descriptions
comes out. Where it comes from:

- ``--model none``: no segmentation (register and report only);
- ``--model ID``: the bundle ``ID``, which must be an automatic ("segmentation") model whose
  inputs are MRI sequences; it is run by the core's automatic-model runner
  ``SegmentationDeepEditLib.segment.segment_images(model_id, images, device=...)``, whose result
  unpacks to ``(label image, segment descriptions)``; optional model inputs (e.g. T2 for
  ``glioma-regions``) are passed when the study has them;
- no ``--model``: ``glioma-regions`` when installed, else the first installed automatic model whose
  inputs a brain study can provide;
  when there is none, each study reports "not segmented: no automatic brain model is installed";
- from Python, any :class:`Segmenter` (used by the tests with a simple threshold model).

The step object is small and picklable, so that worker processes and Dask workers rebuild the
same segmenter.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .identify import SEQUENCES

__all__ = ["SegmentationOutput", "Segmenter", "SegmentStep", "resolve_segment_step", "batch_models", "NO_MODEL",
           "region_volumes_ml"]

NO_MODEL = "no automatic brain model is installed"
DEFAULT_BRAIN_MODEL = "glioma-regions"


@dataclass
class SegmentationOutput:
    """A segmentation on the registered grid.

    Attributes:
        label: integer label map, same geometry as the inputs.
        segments: ``[{"value", "name", "color", "terminology"?}]`` as :func:`imageio.write_segmentation` takes.
        model_id, model_version: what produced it.
        warnings: the model's messages for a reviewer (nothing found, an implausible volume, an
            input stored unlike its training data...).
    """

    label: sitk.Image
    segments: List[Dict[str, Any]]
    model_id: str
    model_version: str
    warnings: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Segmenter:
    """A segmentation function with the names of the sequences it needs.

    ``function(images)`` gets ``{sequence: image}`` for ``inputs`` (registered, same grid)
    and returns ``(label, segments)``. It must be a module-level function so that worker
    processes can pickle it.
    """

    function: Callable[[Dict[str, sitk.Image]], Tuple[sitk.Image, List[Dict[str, Any]]]]
    inputs: Tuple[str, ...]
    model_id: str
    model_version: str = "0.0.0"


def _core_runner() -> Optional[Callable[..., Any]]:
    """The core's automatic-model runner, when this version has one."""
    try:
        mod = importlib.import_module("SegmentationDeepEditLib.segment")
    except ImportError:
        return None
    return getattr(mod, "segment_images", None)


@dataclass(frozen=True)
class SegmentStep:
    """What the study task does for segmentation.

    Attributes:
        kind: "skip", "bundle" or "custom".
        reason: for "skip", the per-study status text.
        model_id, model_version: the model's identity (bundle or custom).
        inputs: the sequences the model needs.
        custom: a :class:`Segmenter` for kind "custom".
        device: device for bundle models.
    """

    kind: str
    reason: str = ""
    model_id: Optional[str] = None
    model_version: Optional[str] = None
    inputs: Tuple[str, ...] = ()
    custom: Optional[Segmenter] = None
    device: str = "auto"
    optional: Tuple[str, ...] = ()

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "model": self.model_id, "version": self.model_version, "inputs": list(self.inputs),
                "optional_inputs": list(self.optional), "reason": self.reason or None}

    def missing(self, available: Sequence[str]) -> List[str]:
        return [s for s in self.inputs if s not in available]

    def run(self, images: Dict[str, sitk.Image]) -> SegmentationOutput:
        """Run the model on ``{sequence: registered image}`` (all inputs present)."""
        if self.kind == "custom" and self.custom is not None:
            label, segments = self.custom.function({k: images[k] for k in self.inputs})
            return SegmentationOutput(label, list(segments), self.custom.model_id, self.custom.model_version)
        if self.kind == "bundle":
            runner = _core_runner()
            if runner is None:
                raise InputError(f"model {self.model_id!r} cannot be run: this version has no automatic-model runner")
            names = list(self.inputs) + [k for k in self.optional if k in images]
            result = runner(self.model_id, {k: images[k] for k in names}, device=self.device)
            label, segments = result
            return SegmentationOutput(label, list(segments), str(self.model_id), str(self.model_version),
                                      list(getattr(result, "warnings", [])))
        raise InputError(f"not segmented: {self.reason}")


def batch_models(bundles: Sequence[Any]) -> List[Any]:
    """The bundles a batch of brain studies can run: automatic models whose inputs are all MRI
    sequences, the default brain model (:data:`DEFAULT_BRAIN_MODEL`, what ``--model`` left out picks) first."""
    usable = [b for b in bundles if b.task == "segmentation" and all(i["name"] in SEQUENCES for i in b.meta["inputs"])]
    return sorted(usable, key=lambda b: (b.id != DEFAULT_BRAIN_MODEL, b.id))


def _bundle_step(b: Any, device: str) -> SegmentStep:
    """The step that runs bundle ``b``: its required and optional inputs by name."""
    return SegmentStep("bundle", model_id=b.id, model_version=b.version, device=device,
                       inputs=tuple(i["name"] for i in b.meta["inputs"] if not i.get("optional")),
                       optional=tuple(i["name"] for i in b.meta["inputs"] if i.get("optional")))


def resolve_segment_step(model: Optional[str], *, custom: Optional[Segmenter] = None, device: str = "auto") -> SegmentStep:
    """Decide the segmentation step of a batch run (before any study is processed).

    Args:
        model: ``--model``: None (the installed brain model, if any), "none", or a bundle id/folder.
        custom: a Python segmenter (overrides ``model``).
        device: device for bundle models.

    Raises:
        ModelError: an unknown model id.
        InputError: the model is not an automatic model, needs inputs a brain study lacks, or
            cannot be run by this version.
    """
    if custom is not None:
        bad = [s for s in custom.inputs if s not in SEQUENCES]
        if bad:
            raise InputError(f"the segmenter needs inputs {bad} that are not MRI sequences ({', '.join(SEQUENCES)})")
        return SegmentStep("custom", model_id=custom.model_id, model_version=custom.model_version,
                           inputs=tuple(custom.inputs), custom=custom)
    if model is not None and model.lower() == "none":
        return SegmentStep("skip", reason="--model none (registration and report only)")
    from ..bundle import list_bundles, load_bundle

    runner = _core_runner()
    if model is None:
        brain = batch_models(list_bundles())  # the 3D glioma model first, when installed
        if not brain:
            return SegmentStep("skip", reason=NO_MODEL)
        b = brain[0]
        if runner is None:
            return SegmentStep("skip", reason=f"model {b.id!r} is installed but this version cannot run automatic "
                                              "models yet")
        return _bundle_step(b, device)
    b = load_bundle(model)
    if b.task != "segmentation":
        raise InputError(f"model {b.id!r} is an annotation model (it needs points); batch needs an automatic model")
    names = [i["name"] for i in b.meta["inputs"]]
    bad = [n for n in names if n not in SEQUENCES]
    if bad:
        raise InputError(f"model {b.id!r} needs inputs {', '.join(bad)}, which a brain MRI study does not have")
    if runner is None:
        raise InputError(f"model {b.id!r} is an automatic model, and this version cannot run automatic models yet")
    return _bundle_step(b, device)


def region_volumes_ml(label: sitk.Image, segments: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Volume in mL of each described segment (by label value)."""
    arr = sitk.GetArrayViewFromImage(label)
    voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
    counts = np.bincount(np.clip(arr.reshape(-1), 0, 255).astype(np.intp), minlength=256)
    return {str(s["name"]): round(float(counts[int(s["value"])]) * voxel_ml, 3) for s in segments}
