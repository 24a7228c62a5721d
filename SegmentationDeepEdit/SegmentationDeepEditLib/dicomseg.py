"""DICOM SEG output (highdicom) for segmentations of images that came from DICOM.

The label map is resampled (nearest neighbour) onto the grid of the source series, as read
from its files sorted along the slice normal, and written as a BINARY segmentation with one
segment per label value, whose frames reference the source instances. Segment properties come
from the segment's Slicer terminology entry string (its category and type codes; a lone
"SCT^code^meaning" is taken as the type, category Organ) when it has one, otherwise
"Morphologically abnormal structure" / "Neoplasm". The SEG repeats the source's patient and
study attributes, as the DICOM standard requires; nothing of them is logged or printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import grid_of, resample_to_grid
from .imageio import atomic_output, check_output_path, slice_normal

__all__ = ["write_dicom_seg", "sorted_source_datasets"]

PathLike = Union[str, Path]


#: The identifiers a DICOM SEG copies from, or references in, its source images.
REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def sorted_source_datasets(files: Sequence[PathLike]):
    """The source series' datasets sorted by position along the slice normal, with their files."""
    import pydicom

    items = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise InputError(f"cannot read the DICOM source image ({type(e).__name__})", f) from None
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise InputError("the DICOM source image has no position or orientation", f)
        blank = [key for key in REFERENCED_UIDS if not str(ds.get(key, "") or "")]
        if blank:  # some anonymisers empty them; a SEG must name the images it segments
            raise InputError(f"the DICOM source image has no {', '.join(blank)} (emptied, e.g. by anonymisation), "
                             "so a DICOM SEG cannot reference it", f)
        items.append((str(f), ds))
    if not items:
        raise InputError("no DICOM source images were given for the DICOM SEG")
    normal = slice_normal(items[0][1].ImageOrientationPatient)  # the orientations must agree (checked below)
    items = sorted(((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))), f, ds) for f, ds in items),
                   key=lambda t: t[0])
    # scanners write the same orientation with jitter in the last digits (1e-8 here); highdicom
    # wants one shared value: use the first slice's (in memory only; the files are not touched)
    iop0 = items[0][2].ImageOrientationPatient
    for _, f, ds in items[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), np.asarray(iop0, float), atol=1e-4):
            raise InputError("the DICOM source images differ in orientation", f)
        ds.ImageOrientationPatient = iop0
    # type-2 attributes highdicom copies from the source: present (empty) when a writer omitted them
    for _, _, ds in items:
        for key in ("StudyID", "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName", "PatientName",
                    "PatientID", "PatientBirthDate", "PatientSex"):
            if key not in ds:
                setattr(ds, key, "")
    return [t[2] for t in items], [t[1] for t in items]


def _coded(code: Optional[str]):
    """A ``scheme^value^meaning`` code as a CodedConcept, or None when it names no value."""
    from highdicom.sr import CodedConcept

    parts = str(code or "").split("^")
    if len(parts) >= 3 and parts[1].strip():
        return CodedConcept(value=parts[1].strip(), scheme_designator=parts[0].strip() or "SCT", meaning=parts[2].strip())
    return None


def _category_and_type(term: Optional[str]):
    """(category, type) codes of a Slicer terminology entry string
    (``context~category~type~modifier~...``) or of a single ``scheme^value^meaning`` type code
    (category None); (None, None) without terminology."""
    items = str(term or "").split("~")
    if len(items) >= 3:
        return _coded(items[1]), _coded(items[2])
    return None, _coded(items[0])


def write_dicom_seg(
    label: sitk.Image,
    segments: Sequence[Dict[str, Any]],
    source_files: Sequence[PathLike],
    path: PathLike,
    *,
    model_id: str = "SegmentationDeepEdit",
    model_version: str = "0",
    series_description: str = "SegmentationDeepEdit",
    overwrite: bool = False,
) -> Path:
    """Write ``label`` as a DICOM SEG that references the source series (see module docstring).

    Args:
        label: integer label map (any geometry overlapping the source series).
        segments: ``[{"value", "name", "color", "terminology"?}]``; one SEG segment each.
        source_files: the files of the DICOM series the segmentation belongs to.
        path: output ``.dcm`` file.

    Raises:
        InputError: unreadable sources, no segments, or a write failure.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = check_output_path(Path(path), overwrite=overwrite, allowed=(".dcm",))
    if not segments:
        raise InputError("no segments to write", out)
    datasets, files = sorted_source_datasets(source_files)
    reference = sitk.ReadImage(files)  # the source grid, slices in the sorted order
    if reference.GetDimension() != 3:
        reference = sitk.JoinSeries([reference])
    on_source = resample_to_grid(label, grid_of(reference), interpolator=sitk.sitkNearestNeighbor, default=0,
                                 pixel_type=sitk.sitkUInt8)
    arr = sitk.GetArrayViewFromImage(on_source)  # [frames, rows, columns]
    masks = np.stack([(arr == int(s["value"])) for s in segments], axis=-1).astype(np.uint8)
    category_default = codes.SCT.MorphologicallyAbnormalStructure
    type_default = codes.SCT.Neoplasm
    algorithm = hd.AlgorithmIdentificationSequence(name=model_id, version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions: List[Any] = []
    for n, s in enumerate(segments, start=1):
        category, prop_type = _category_and_type(s.get("terminology"))
        if prop_type is None:
            category, prop_type = category_default, type_default
        elif category is None:
            category = codes.SCT.Organ
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=str(s["name"])[:64], segmented_property_category=category,
            segmented_property_type=prop_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="SegmentationDeepEdit",
            manufacturer_model_name=model_id[:64], software_versions=str(model_version), device_serial_number="0",
            series_description=series_description[:64], omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"cannot build the DICOM SEG: {e}", out) from None
    with atomic_output(out, overwrite) as tmp:
        seg.save_as(str(tmp))
    return out
