"""Batch labelling of study folders: find series, identify sequences, register, segment, report.

One code path for ``deepedit batch`` and the Slicer batch tab:

- :mod:`.discover`: studies and series in an input folder (DICOM split by series and study);
- :mod:`.identify`: T1/T1c/T2/FLAIR/DWI/SWI from names and DICOM headers, with a confidence,
  and the user's mapping file;
- :mod:`.plan`: per study, which series is used for which sequence, and the reference;
- :mod:`.register`: rigid registration to the reference (Mattes MI, multi-resolution) and its
  quality verdict;
- :mod:`.segment`: the pluggable segmentation step;
- :mod:`.report`: report.json, the QC picture, summary.csv, errors.csv;
- :mod:`.manifest`: the resumable state of a run;
- :mod:`.run`: the per-study task and the driver (sequential, worker processes, Dask).

Physical points are LPS mm throughout; no patient name or ID is ever written.
"""

from .discover import Series, Study, discover_studies
from .identify import IGNORE, SEQUENCES, Identification, Mapping, identify, load_mapping
from .plan import StudyPlan, plan_study
from .register import QualityThresholds, RegistrationSettings, register_rigid, registration_quality
from .run import (EXIT_NOTHING_DONE, EXIT_OK, EXIT_SOME_FAILED, BatchOptions, BatchResult, StudyResult, plan_batch,
                  process_study, run_batch)
from .segment import Segmenter, SegmentStep, resolve_segment_step

__all__ = [
    "Series", "Study", "discover_studies", "IGNORE", "SEQUENCES", "Identification", "Mapping", "identify",
    "load_mapping", "StudyPlan", "plan_study", "QualityThresholds", "RegistrationSettings", "register_rigid",
    "registration_quality", "EXIT_NOTHING_DONE", "EXIT_OK", "EXIT_SOME_FAILED", "BatchOptions", "BatchResult",
    "StudyResult", "plan_batch", "process_study", "run_batch", "Segmenter", "SegmentStep", "resolve_segment_step",
]
