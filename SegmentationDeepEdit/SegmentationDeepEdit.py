"""SegmentationDeepEdit: the Slicer module (widget wiring and MRML <-> core conversion only).

Everything that decides something lives in the pure core package ``SegmentationDeepEditLib``
(geometry and points in ``slicer_bridge``, inference in ``annotate``, the background process in
``worker``). The core is imported lazily inside functions: it needs torch and MONAI, which may
not be installed yet when Slicer loads this file.

Inference runs in a persistent worker process (``python -m SegmentationDeepEditLib.worker``)
that keeps the model loaded; a reader thread in the core's ``WorkerClient`` queues its messages
and a ``qt.QTimer`` here drains the queue, so the user interface never waits on the network.

Coordinates: Slicer works in RAS, the core in LPS (ITK). Points are taken in world coordinates
(parent transforms applied) and converted RAS -> LPS here, at the edge, and only here. Arrays
from ``slicer.util.arrayFromVolume`` and from ``SimpleITK.GetArrayFromImage`` are both [k, j, i].
"""

import importlib.util
import logging
import os
import pathlib
import sys
from typing import Annotated, Dict, List, Optional, Sequence

import ctk
import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

# So that ``import SegmentationDeepEditLib`` works when the module is loaded from the source
# tree through "Additional module paths" (an installed module's folder is on sys.path already).
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

# Installed, the bundles sit in <module dir>/Resources/Models (see CMakeLists.txt), where the
# core does not look by itself; from the source tree the core finds <repo>/Resources/Models.
# Folders the user has set come first, so their own bundles win over ours. The worker process
# inherits this environment.
_INSTALLED_MODELS_DIR = os.path.join(_MODULE_DIR, "Resources", "Models")
if os.path.isdir(_INSTALLED_MODELS_DIR):
    _dirs = [d for d in os.environ.get("DEEPEDIT_MODELS_DIR", "").split(os.pathsep) if d]
    if _INSTALLED_MODELS_DIR not in _dirs:
        os.environ["DEEPEDIT_MODELS_DIR"] = os.pathsep.join(_dirs + [_INSTALLED_MODELS_DIR])

NUMBER_OF_EXTREME_POINTS = 6
AUTO_UPDATE_DELAY_MS = 300  # wait this long after the last point move before re-running
WORKER_POLL_MS = 40  # how often the worker's messages are read while it works
WORKER_MODULE = "SegmentationDeepEditLib.worker"
REQUEST_TIMEOUT_S = 600  # blocking calls (self-test, scripts) give up after this long
BATCH_POLL_MS = 500  # how often the batch worker's messages are read (and the study table refreshed)
SEGMENT_EDITOR_SINGLETON_TAG = "SegmentationDeepEdit"
DEMO_SAMPLE_NAME = "DeepEditSyntheticGlioma"

# Python packages the core needs beyond what Slicer ships (numpy, scipy, SimpleITK, vtk are
# never installed or upgraded from here). Import name -> pip requirement.
REQUIREMENTS = {
    "torch": "torch>=2.0",
    "monai": "monai>=1.3",
    "safetensors": "safetensors>=0.4",
    "jsonschema": "jsonschema>=4.0",
    "slicerio": "slicerio>=1.0",
}
# Only the demo case needs these: the synthetic brain starts from nilearn's MNI152 template.
DEMO_REQUIREMENTS = {"nilearn": "nilearn>=0.10"}
# Distributions that Slicer itself ships: pinned to the installed version in every pip call,
# so that pip can only fail, never replace them.
SLICER_OWNED_DISTRIBUTIONS = ("numpy", "SimpleITK", "scipy")


def missingPackages(requirements: Optional[Dict[str, str]] = None) -> List[str]:
    """Import names that cannot be found (found is not imported: torch is slow to import)."""
    return [name for name in (requirements or REQUIREMENTS) if importlib.util.find_spec(name) is None]


def pipRequirements(missing: Sequence[str], requirements: Optional[Dict[str, str]] = None) -> List[str]:
    """pip arguments that install ``missing`` (import names) while holding Slicer's own packages fixed."""
    import importlib.metadata

    requirements = {**REQUIREMENTS, **DEMO_REQUIREMENTS, **(requirements or {})}
    args = [requirements[name] for name in missing]
    for dist in SLICER_OWNED_DISTRIBUTIONS:
        try:
            args.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass  # not a pip distribution in this Slicer build: nothing pip could replace
    return args


#
# SegmentationDeepEdit
#


class SegmentationDeepEdit(ScriptedLoadableModule):
    """Module description; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segmentation DeepEdit")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SegmentationDeepEdit developers"]
        self.parent.helpText = _("""
Click six extreme points of a tumour or organ (its left, right, anterior, posterior, superior and
inferior extremes) and get a 3D segment from a deep network, on the CPU in about a second.
Move a point, or add a + click inside what is missing or a - click on what is wrongly included,
and the segment is computed again. The result is an ordinary segment: edit it with the Segment
Editor below. No data at hand? Load the generated demo case (button here, or Sample Data).
""")
        self.parent.acknowledgementText = _("""
The method follows Deep Extreme Cut (DExtr3D) and DeepEdit, with a SegResNet network
(Myronenko 2018), built on MONAI and PyTorch.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a generated case, made by the core's synthetic generator in the worker
#


def registerSampleData():
    """Add "DeepEditSyntheticGlioma" to the Sample Data module; its button generates the case."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SegmentationDeepEdit",
        sampleName=DEMO_SAMPLE_NAME,
        uris=[],  # nothing to download: customDownloader generates the files
        fileNames=[],
        thumbnailFileName=os.path.join(_MODULE_DIR, "Resources", "Icons", "SegmentationDeepEdit.png"),
        customDownloader=_generateDemoCase,
    )


def _generateDemoCase(source=None):
    """Sample Data button callback (it passes the data source); a progress dialog while the worker generates."""
    logic = SegmentationDeepEditLogic()
    with slicer.util.tryWithErrorDisplay(_("Could not generate the demo case."), waitCursor=True):
        logic.ensureDemoDependencies()  # its questions and installs come before the progress dialog
    dialog = _busyDialog(_("Generating the demo case..."), maximum=100)

    def progress(stage: str, fraction: float) -> None:
        dialog.labelText = _("Generating the demo case: {stage}").format(stage=stage) if stage else dialog.labelText
        dialog.value = int(round(100 * fraction))

    try:
        with slicer.util.tryWithErrorDisplay(_("Could not generate the demo case."), waitCursor=True):
            logic.loadDemoCase(progress=progress)
    finally:
        dialog.close()


def _busyDialog(text: str, maximum: int = 0):
    """A modal progress dialog without a cancel button (``maximum`` 0: a busy indicator) that stays up
    until closed; modal, so that clicks while it runs cannot start the same work again."""
    dialog = slicer.util.createProgressDialog(labelText=text, windowTitle="SegmentationDeepEdit", maximum=maximum,
                                              autoReset=False, autoClose=False)
    dialog.setWindowModality(qt.Qt.ApplicationModal)
    dialog.setCancelButton(None)  # Qt: no cancel button (this work cannot be stopped half-way)
    slicer.app.processEvents()
    return dialog


#
# SegmentationDeepEditParameterNode
#


@parameterNodeWrapper
class SegmentationDeepEditParameterNode:
    """State of the module, saved with the scene.

    inputVolume - the image to segment (the first input of the annotation model).
    extremePoints - six control points on the object's extremes (world positions are used).
    positivePoints - corrective clicks inside what the result misses.
    negativePoints - corrective clicks on what the result wrongly includes.
    outputSegmentation - where the result goes; created on first run if not set.
    segmentId - the segment the result replaces; empty: a new segment is added.
    modelId - id of the annotation model bundle; empty: the core's default.
    device - "auto" (CUDA when present, else CPU), "cpu" or "cuda".
    tta - average the prediction over flips (slower, slightly smoother).
    autoUpdate - run when the sixth point is placed and whenever a point is moved or added.
    autoModelId, autoOutputSegmentation, autoDevice, autoTta, autoFast - the Auto-segment tab.
    batchInputDir, batchOutputDir, batchMappingFile (optional), batchModelId ("" = default brain model, "none" = register only),
    batchWorkers, batchResume - the Batch tab (the settings of ``deepedit batch``).
    (The extra input volumes of multi-input models are node references of the parameter node,
    roles "annotateInput.<name>" and "autoInput.<name>".)
    """

    inputVolume: vtkMRMLScalarVolumeNode
    extremePoints: vtkMRMLMarkupsFiducialNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    outputSegmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    modelId: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    tta: bool = False
    autoUpdate: bool = True
    autoModelId: str = ""
    autoOutputSegmentation: vtkMRMLSegmentationNode
    autoDevice: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    autoTta: bool = False
    autoFast: bool = False
    batchInputDir: pathlib.Path
    batchOutputDir: pathlib.Path
    batchMappingFile: pathlib.Path
    batchModelId: str = ""
    batchWorkers: Annotated[int, WithinRange(1, 64)] = 1
    batchResume: bool = False


#
# SegmentationDeepEditWidget
#


class SegmentationDeepEditWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Widget; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPointNodes = []
        self._autoUpdateTimer = None
        self._pollTimer = None
        self._pending = {}  # request id -> what to do with its answer
        self._rerunRequested = False
        self._restoringPoints = False
        self._lastAnnotateFields = None
        self._target = None  # AnnotationTarget: which segment the next clicks refine (set up in setup())
        self._starting = False  # a run is being prepared (events are processed while volumes are written)
        self._shownOutputId = None  # the output segmentation the segment id belongs to
        self._dependenciesDeclined = False
        self._models = {}  # bundle id -> bundle (both tabs)
        self._inputSelectors = {"annotate": {}, "auto": {}}  # tab -> input name -> qMRMLNodeComboBox
        self._inputWidgets = {"annotate": None, "auto": None}
        self.segmentEditorWidget = None
        self._batchTimer = None
        self._batchPending = {}  # request id -> {"kind": "plan" or "run", "outputDir"}
        self._batchPlans = []  # the last plans found (rows of the study table before a run)
        self._batchOutputDir = None  # output folder of the run shown in the table

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegmentationDeepEdit.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegmentationDeepEditLogic()
        from SegmentationDeepEditLib.slicer_bridge import AnnotationTarget

        self._target = AnnotationTarget()

        for placeWidget in (self.ui.pointsPlaceWidget, self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            placeWidget.buttonsVisible = True
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False

        # A new markups node made from the selector gets the six-point limit at once
        self.ui.pointsSelector.connect("nodeAddedByUser(vtkMRMLNode*)", self.logic.configurePointsNode)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentSelected)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.autoModelComboBox.connect("currentIndexChanged(int)", self.onAutoModelSelected)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegmentButton)
        self.ui.autoApplyButton.connect("clicked(bool)", self.onAutoApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.loadDemoButton.connect("clicked(bool)", self.onLoadDemoButton)

        # Batch tab: the same run as "deepedit batch", in a worker process of its own
        for pathEdit in (self.ui.batchInputPathLineEdit, self.ui.batchOutputPathLineEdit):
            pathEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.batchProgressBar.setVisible(False)
        self.ui.batchModelComboBox.connect("currentIndexChanged(int)", self.onBatchModelSelected)
        self.ui.batchFindButton.connect("clicked(bool)", self.onBatchFindButton)
        self.ui.batchRunButton.connect("clicked(bool)", self.onBatchRunButton)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onBatchCancelButton)
        self.ui.batchLoadButton.connect("clicked(bool)", self.onBatchLoadButton)
        self._batchTimer = qt.QTimer()
        self._batchTimer.setInterval(BATCH_POLL_MS)
        self._batchTimer.connect("timeout()", self.onPollBatch)

        # One single-shot timer: every point event restarts it, so a drag runs once it pauses
        self._autoUpdateTimer = qt.QTimer()
        self._autoUpdateTimer.setSingleShot(True)
        self._autoUpdateTimer.setInterval(AUTO_UPDATE_DELAY_MS)
        self._autoUpdateTimer.connect("timeout()", self.onAutoUpdateTimeout)
        # Reads the worker's queue while a request is in flight
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(WORKER_POLL_MS)
        self._pollTimer.connect("timeout()", self.onPollWorker)

        # Segment Editor inside the module: correcting a result is one click away
        self.segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        self.segmentEditorWidget.setMaximumNumberOfUndoStates(10)
        self.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.segmentEditorWidget.segmentationNodeSelectorVisible = False
        self.segmentEditorWidget.sourceVolumeNodeSelectorVisible = False
        self.ui.segmentEditorCollapsibleButton.layout().addWidget(self.segmentEditorWidget)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for timer in (self._autoUpdateTimer, self._pollTimer, self._batchTimer):
            if timer:
                timer.stop()
        if self.segmentEditorWidget:
            self.segmentEditorWidget.setActiveEffect(None)
            self.segmentEditorWidget.uninstallKeyboardShortcuts()  # Reload calls cleanup(), not exit()
            self.segmentEditorWidget.removeViewObservations()
        self.removeObservers()
        if self.logic:
            self.logic.stopWorker()
            self.logic.stopBatchWorker(kill=True)

    def enter(self) -> None:
        self.initializeParameterNode()
        self.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.segmentEditorWidget.updateWidgetFromMRML()
        # Ctrl+Z / Ctrl+Y (undo a result), effect shortcuts: as Slicer's Segment Editor module does on enter
        self.segmentEditorWidget.installKeyboardShortcuts()
        # Start the worker and load the model while the user clicks, if nothing must be installed
        if not self.logic.missingDependencies():
            self._warmUp()

    def exit(self) -> None:
        # Points moved while another module is shown do not re-run; the GUI is refreshed on enter
        self._observePointNodes([])
        self._autoUpdateTimer.stop()
        self.segmentEditorWidget.setActiveEffect(None)
        self.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.segmentEditorWidget.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onReload(self) -> None:
        """Reload the module and the core package (forgotten here, re-imported on next use)."""
        if self.logic:
            self.logic.stopWorker()
            self.logic.stopBatchWorker(kill=True)
        for name in [n for n in sys.modules if n == "SegmentationDeepEditLib" or n.startswith("SegmentationDeepEditLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        # Answers still on their way are for nodes about to disappear: forget them (the worker stays)
        self._pending = {}
        self._rerunRequested = False
        self._lastAnnotateFields = None
        self._setIdle()
        self.setParameterNode(None)
        self.segmentEditorWidget.setSegmentationNode(None)
        self.segmentEditorWidget.removeViewObservations()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene copies its saved state into the parameter node: its output and segment are current."""
        p = self._parameterNode
        output = p.outputSegmentation if p else None
        self._shownOutputId = output.GetID() if output else None
        self.onParameterNodeModified()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())

    # Parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                p.inputVolume = firstVolumeNode
        # Ready to click: the user only has to press "place"
        if not p.extremePoints:
            p.extremePoints = self.logic.createPointsNode("ExtremePoints", "extreme")
        if not p.positivePoints:
            p.positivePoints = self.logic.createPointsNode("AddClicks", "positive")
        if not p.negativePoints:
            p.negativePoints = self.logic.createPointsNode("RemoveClicks", "negative")
        if not p.modelId and self.ui.modelComboBox.enabled:
            self.onModelSelected(self.ui.modelComboBox.currentIndex)
        if not p.autoModelId and self.ui.autoModelComboBox.enabled:
            self.onAutoModelSelected(self.ui.autoModelComboBox.currentIndex)

    def setParameterNode(self, inputParameterNode: Optional[SegmentationDeepEditParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        output = inputParameterNode.outputSegmentation if inputParameterNode else None
        self._shownOutputId = output.GetID() if output else None  # a loaded scene's segment stays current
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" property in the .ui are bound here
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Sync the widgets that connectGui does not bind, and the point observations."""
        p = self._parameterNode
        nodes = [p.extremePoints, p.positivePoints, p.negativePoints] if p else [None, None, None]
        self._observePointNodes([n for n in nodes if n])
        for placeWidget, node in zip((self.ui.pointsPlaceWidget, self.ui.positivePlaceWidget, self.ui.negativePlaceWidget), nodes):
            placeWidget.setCurrentNode(node)

        segmentationNode = p.outputSegmentation if p else None
        outputId = segmentationNode.GetID() if segmentationNode else None
        if p and outputId != self._shownOutputId and not slicer.mrmlScene.IsImporting():
            # Another output segmentation: the segment id belonged to the old one (ids such as
            # "Segment_1" repeat across segmentations), so the next result is a new segment there.
            self._shownOutputId = outputId
            self._target.detach()
            if p.segmentId:
                p.segmentId = ""  # re-enters this method once, with nothing left to change
        wasBlocked = self.ui.segmentSelector.blockSignals(True)
        self.ui.segmentSelector.setCurrentNode(segmentationNode)
        self.ui.segmentSelector.setCurrentSegmentID(p.segmentId if p else "")
        self.ui.segmentSelector.blockSignals(wasBlocked)
        if self.segmentEditorWidget:
            self.segmentEditorWidget.setSegmentationNode(segmentationNode)
            # (a source volume without a segmentation is refused with an error in the log)
            self.segmentEditorWidget.setSourceVolumeNode(p.inputVolume if p and segmentationNode else None)
            if p and p.segmentId:
                self.segmentEditorWidget.setCurrentSegmentID(p.segmentId)

        if p:
            for combo, modelId in ((self.ui.modelComboBox, p.modelId), (self.ui.autoModelComboBox, p.autoModelId)):
                index = combo.findData(modelId) if modelId else -1
                if index >= 0 and index != combo.currentIndex:
                    wasBlocked = combo.blockSignals(True)
                    combo.currentIndex = index
                    combo.blockSignals(wasBlocked)
            index = self.ui.batchModelComboBox.findData(p.batchModelId)  # "" (the default model) is an item too
            if index >= 0 and index != self.ui.batchModelComboBox.currentIndex:
                wasBlocked = self.ui.batchModelComboBox.blockSignals(True)
                self.ui.batchModelComboBox.currentIndex = index
                self.ui.batchModelComboBox.blockSignals(wasBlocked)
        self._updateHint()
        self._checkCanApply()

    # Points

    def _observePointNodes(self, pointNodes) -> None:
        if [n.GetID() for n in pointNodes] == [n.GetID() for n in self._observedPointNodes]:
            return
        events = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                  slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                  slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
        for node in self._observedPointNodes:
            for event in events:
                self.removeObserver(node, event, self.onPointsModified)
        self._observedPointNodes = list(pointNodes)
        for node in self._observedPointNodes:
            # PointPositionDefinedEvent: a point was placed (the sixth one starts a run);
            # PointModifiedEvent: a point moved (also fires, with preview status, while placing).
            for event in events:
                self.addObserver(node, event, self.onPointsModified)

    def onPointsModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p and caller is not None and p.extremePoints and caller.GetID() == p.extremePoints.GetID():
            self.logic.labelExtremePoints(p.extremePoints)
        self._updateHint()
        self._checkCanApply()
        if not p or not p.autoUpdate or self._restoringPoints:
            return
        if self._canApply():
            self._autoUpdateTimer.start()

    def onAutoUpdateTimeout(self) -> None:
        p = self._parameterNode
        if not p or not p.autoUpdate or not self._canApply():
            return
        self.startAnnotation(showErrors=False)

    def _updateHint(self) -> None:
        p = self._parameterNode
        node = p.extremePoints if p else None
        if node is None:
            self.ui.pointsHintLabel.text = ""
            return
        from SegmentationDeepEditLib.slicer_bridge import next_extreme_hint

        self.ui.pointsHintLabel.text = next_extreme_hint(
            self.logic.numberOfDefinedPoints(node), node.GetNumberOfControlPoints())

    def onSegmentSelected(self, segmentId) -> None:
        p = self._parameterNode
        if not p:
            return
        if (segmentId or "") != p.segmentId:
            self._target.detach()  # a result still running no longer picks the segment the next clicks refine
            self._rerunRequested = False
        gone = bool(p.segmentId and p.outputSegmentation
                    and p.outputSegmentation.GetSegmentation().GetSegment(p.segmentId) is None)
        if gone:
            # The current segment was removed (undo of its first result, or deleted): the selector moved
            # on by itself. Keep the user's points, choose nothing, and make the next result a new segment.
            p.segmentId = ""
            wasBlocked = self.ui.segmentSelector.blockSignals(True)
            self.ui.segmentSelector.setCurrentSegmentID("")
            self.ui.segmentSelector.blockSignals(wasBlocked)
            return
        p.segmentId = segmentId or ""
        if not segmentId or not p.outputSegmentation:
            return
        # A segment made here remembers its clicks: bring them back, without re-running
        stored = self.logic.pointsOfSegment(p.outputSegmentation, segmentId)
        if stored is None:
            return
        self._restoringPoints = True
        try:
            self.logic.setPointsLps(p.extremePoints, stored.extreme)
            self.logic.setPointsLps(p.positivePoints, stored.positive)
            self.logic.setPointsLps(p.negativePoints, stored.negative)
            self.logic.labelExtremePoints(p.extremePoints)
        finally:
            self._restoringPoints = False
        self._autoUpdateTimer.stop()
        self._lastAnnotateFields = None
        self._updateHint()

    def onNewSegmentButton(self) -> None:
        """Start a new object: forget the clicks, and make the next result a new segment."""
        p = self._parameterNode
        if not p:
            return
        self._restoringPoints = True
        try:
            for node in (p.extremePoints, p.positivePoints, p.negativePoints):
                if node:
                    node.RemoveAllControlPoints()
            p.segmentId = ""
        finally:
            self._restoringPoints = False
        self._target.detach()  # a run still in flight writes its own object, not this new one's segment
        self._rerunRequested = False
        self._autoUpdateTimer.stop()
        self._lastAnnotateFields = None
        self.ui.pointsPlaceWidget.setPlaceModeEnabled(True)

    # Models and their inputs

    def populateModels(self) -> None:
        """Fill both model selectors from the bundles the core finds."""
        try:
            annotation = self.logic.models("annotation")
            automatic = self.logic.models("segmentation")
        except ImportError as e:
            # The core reads bundle metadata with jsonschema, which may not be installed yet
            logging.info(f"SegmentationDeepEdit: models not listed yet ({e})")
            annotation = automatic = None
        except Exception as e:
            logging.warning(f"SegmentationDeepEdit: could not list the models: {e}")
            annotation = automatic = []
        self._models = {b.id: b for b in (annotation or []) + (automatic or [])}
        for combo, bundles, none in ((self.ui.modelComboBox, annotation, _("(no annotation model found)")),
                                     (self.ui.autoModelComboBox, automatic, _("(no automatic model installed yet)"))):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            if bundles is None:
                combo.addItem(_("(press Segment to install the required Python packages)"), "")
                combo.enabled = False
            elif not bundles:
                combo.addItem(none, "")
                combo.enabled = False
            else:
                if combo is self.ui.modelComboBox and len(bundles) > 1:
                    # No model named: the core picks by the image (the CT-tuned model for CT)
                    combo.addItem(_("Automatic (by image: CT-tuned model for CT)"), "")
                    combo.setItemData(combo.count - 1, _("The default annotation model, or the CT-tuned one when the "
                                                         "volume is a CT (Hounsfield units)."), qt.Qt.ToolTipRole)
                for b in bundles:
                    combo.addItem(b.name, b.id)
                    combo.setItemData(combo.count - 1, b.description, qt.Qt.ToolTipRole)
                combo.enabled = True
            combo.blockSignals(wasBlocked)
        p = self._parameterNode
        if p:
            for combo, modelId, handler in ((self.ui.modelComboBox, p.modelId, self.onModelSelected),
                                            (self.ui.autoModelComboBox, p.autoModelId, self.onAutoModelSelected)):
                index = combo.findData(modelId) if modelId else -1
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = max(index, 0)
                combo.blockSignals(wasBlocked)
                handler(combo.currentIndex)
        self.ui.autoApplyButton.enabled = bool(automatic)
        self.populateBatchModels(automatic)

    def populateBatchModels(self, automatic) -> None:
        """Batch model choices: the default brain model, the other brain models, and "none" (register only)."""
        from_core = self.logic.batchModels(automatic) if automatic else []
        combo = self.ui.batchModelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for i, b in enumerate(from_core):
            combo.addItem(b.name + (_(" (default)") if i == 0 else ""), "" if i == 0 else b.id)
            combo.setItemData(combo.count - 1, b.description, qt.Qt.ToolTipRole)
        if not from_core:  # not listed yet (packages missing) or none installed: the run decides
            combo.addItem(_("default brain model"), "")
        combo.addItem(_("none: register and report only"), "none")
        p = self._parameterNode
        index = combo.findData(p.batchModelId) if p else -1
        combo.currentIndex = max(index, 0)
        combo.blockSignals(wasBlocked)
        self.onBatchModelSelected(combo.currentIndex)

    def onModelSelected(self, index) -> None:
        p = self._parameterNode
        if not p or index < 0:
            return
        p.modelId = self.ui.modelComboBox.itemData(index) or ""
        # "Automatic": the widgets follow the default model (both annotation models take the same inputs)
        bundle = self._models.get(p.modelId) or next((b for b in self._models.values() if b.task == "annotation"), None)
        channels = bundle.meta.get("guidance", {}).get("channels", []) if bundle else []
        for widget, channel in ((self.ui.positivePlaceWidget, "positive"), (self.ui.negativePlaceWidget, "negative")):
            widget.enabled = channel in channels
            widget.toolTip = "" if channel in channels else _("The selected model takes no corrective clicks.")
        self.ui.modelDescriptionLabel.text = "" if not bundle else bundle.description if p.modelId else _(
            "Picked for each volume: the CT-tuned annotation model for a CT, the default one otherwise.")
        # The first input is "Input volume"; multi-input models get a selector per further input
        self._buildInputSelectors("annotate", bundle.meta["inputs"][1:] if bundle else [], self.ui.annotateInputsFrame)
        self._lastAnnotateFields = None
        if self.logic.workerRunning():
            self._warmUp()

    def onAutoModelSelected(self, index) -> None:
        p = self._parameterNode
        if not p or index < 0:
            return
        p.autoModelId = self.ui.autoModelComboBox.itemData(index) or ""
        bundle = self._models.get(p.autoModelId)
        self.ui.autoModelDescriptionLabel.text = bundle.description if bundle else ""
        self._buildInputSelectors("auto", bundle.meta["inputs"] if bundle else [], self.ui.autoInputsFrame)

    def onBatchModelSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.batchModelId = self.ui.batchModelComboBox.itemData(index) or ""

    def _buildInputSelectors(self, tab: str, inputs: list, frame) -> None:
        """One volume selector per declared input, pre-set from the parameter node or guessed from names."""
        old = self._inputWidgets[tab]
        if old is not None:
            old.deleteLater()
        self._inputSelectors[tab] = {}
        container = qt.QWidget()
        form = qt.QFormLayout(container)
        form.setContentsMargins(0, 0, 0, 0)
        frame.layout().addWidget(container)
        self._inputWidgets[tab] = container
        frame.setVisible(bool(inputs))
        if not inputs:
            return
        p = self._parameterNode
        guessed = self.logic.guessInputVolumes(inputs)
        for spec, guess in zip(inputs, guessed):
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.showChildNodeTypes = False
            selector.noneEnabled = True
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = _("Volume for the model's input '{name}' ({modality}).").format(
                name=spec["name"], modality=spec.get("modality", "any"))
            stored = self.logic.inputVolumeOf(p, tab, spec["name"]) if p else None
            selector.setCurrentNode(stored or guess)
            selector.connect("currentNodeChanged(vtkMRMLNode*)",
                             lambda node, t=tab, n=spec["name"]: self.logic.setInputVolumeOf(self._parameterNode, t, n, node))
            self.logic.setInputVolumeOf(p, tab, spec["name"], selector.currentNode())
            form.addRow(f"{spec['name']}:", selector)
            self._inputSelectors[tab][spec["name"]] = selector

    # Apply, progress, cancel

    def _canApply(self) -> bool:
        p = self._parameterNode
        return bool(p and p.inputVolume and p.extremePoints
                    and self.logic.numberOfDefinedPoints(p.extremePoints) == NUMBER_OF_EXTREME_POINTS
                    and p.extremePoints.GetNumberOfControlPoints() == NUMBER_OF_EXTREME_POINTS)

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if self._canApply():
            self.ui.segmentButton.toolTip = _("Segment the object enclosed by the six points")
            self.ui.segmentButton.enabled = True
        else:
            n = self.logic.numberOfDefinedPoints(p.extremePoints) if p and p.extremePoints else 0
            self.ui.segmentButton.toolTip = _("Select an input volume and place six extreme points ({n} placed)").format(n=n)
            self.ui.segmentButton.enabled = False

    def onSegmentButton(self) -> None:
        self.startAnnotation(showErrors=True, force=True)

    def _ensureDependencies(self, showErrors: bool) -> bool:
        """True when the packages are there; asks once, and only once per session for automatic runs."""
        if self._dependenciesDeclined and not showErrors:
            return False
        try:
            ok = self.logic.ensureDependencies(askConfirmation=True)
        except Exception as e:
            self._reportError(_("Installing the Python packages failed."), str(e), showErrors)
            return False
        if not ok:
            self._dependenciesDeclined = True
            self.ui.statusLabel.text = _("The required Python packages are not installed.")
            return False
        if not self.ui.modelComboBox.enabled or not self._models:
            self.populateModels()  # packages may have just been installed
        return True

    def startAnnotation(self, showErrors: bool = False, force: bool = False) -> None:
        """Send the current points to the worker; the answer is handled in :meth:`onPollWorker`.

        Errors from the button open a dialog; errors from an automatic update (while the user
        drags points) go to the status label only, so that a drag does not raise a dialog storm.
        """
        if self._starting or any(ctx["kind"] == "annotate" for ctx in self._pending.values()):
            self._rerunRequested = True  # run once more with the newest points when this one is done
            return
        p = self._parameterNode
        if not p or not self._canApply() or not self._ensureDependencies(showErrors):
            return
        try:
            if not p.outputSegmentation:
                p.outputSegmentation = self.logic.createSegmentationNode(p.inputVolume)
            self._starting = True  # events are processed below: a click or a timer meanwhile must not start another
            try:
                if self.logic.needsExchangeFile(p.inputVolume):  # a large volume takes seconds to hand over
                    self.ui.statusLabel.text = _("Preparing the image...")
                    slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)
                fields = self.logic.annotationFields(
                    p.inputVolume, p.extremePoints, p.positivePoints, p.negativePoints, modelId=p.modelId,
                    device=p.device, tta=p.tta, extraInputs=self._inputVolumes("annotate"))
            finally:
                self._starting = False
            if not force and fields == self._lastAnnotateFields:
                return  # e.g. a preview point moved: nothing that matters changed
            rid = self.logic.sendRequest("annotate", fields)
        except Exception as e:
            self._reportError(_("Segmentation failed."), str(e), showErrors)
            return
        self._lastAnnotateFields = fields
        self._pending[rid] = {
            "kind": "annotate", "showErrors": showErrors, "volumeNode": p.inputVolume,
            "segmentationNode": p.outputSegmentation, "segmentId": p.segmentId, "fields": fields,
            "ticket": self._target.ticket(p.outputSegmentation.GetID(), p.segmentId)}
        self._setBusy(_("Segmenting..."))

    def onAutoApplyButton(self) -> None:
        p = self._parameterNode
        if self._starting or any(ctx["kind"] == "segment" for ctx in self._pending.values()):
            self.ui.statusLabel.text = _("Automatic segmentation is still running (Cancel stops it).")
            return  # a double click queues no second run (nor a second segmentation node)
        if not p or not p.autoModelId or not self._ensureDependencies(True):
            return
        inputs = self._inputVolumes("auto")
        bundle = self._models.get(p.autoModelId)
        optional = [spec["name"] for spec in bundle.meta["inputs"] if spec.get("optional")] if bundle else []
        self._starting = True  # (see startAnnotation)
        try:
            if any(node is not None and self.logic.needsExchangeFile(node) for node in inputs.values()):
                self.ui.statusLabel.text = _("Preparing the images...")
                slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)
            fields = self.logic.segmentFields(p.autoModelId, inputs, device=p.autoDevice, tta=p.autoTta, fast=p.autoFast,
                                              optional=optional)
            rid = self.logic.sendRequest("segment", fields)
        except Exception as e:
            self._reportError(_("Automatic segmentation failed."), str(e), True)
            return
        finally:
            self._starting = False
        referenceName = bundle.meta.get("segmentation", {}).get("reference") if bundle else None
        referenceVolume = inputs.get(referenceName) or next((node for node in inputs.values() if node), None)
        self._pending[rid] = {"kind": "segment", "showErrors": True, "volumeNode": referenceVolume,
                              "segmentationNode": p.autoOutputSegmentation, "modelId": p.autoModelId}
        self._setBusy(_("Segmenting automatically..."))

    def onLoadDemoButton(self) -> None:
        self.ui.loadDemoButton.enabled = False  # one demo at a time
        try:
            _generateDemoCase()
        finally:
            self.ui.loadDemoButton.enabled = True

    def _warmUp(self) -> None:
        """Start the worker and load the selected model, so that the first click is fast."""
        p = self._parameterNode
        try:
            rid = self.logic.sendRequest("load", {"model": (p.modelId if p else "") or None,
                                                  "device": p.device if p else "auto"})
        except Exception as e:
            logging.info(f"SegmentationDeepEdit: worker not started ({e})")
            return
        self._pending[rid] = {"kind": "load", "showErrors": False}
        self._pollTimer.start()

    def _inputVolumes(self, tab: str) -> dict:
        return {name: selector.currentNode() for name, selector in self._inputSelectors[tab].items()}

    def _setBusy(self, text: str) -> None:
        self.ui.statusLabel.text = text
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.cancelButton.enabled = True
        self._pollTimer.start()

    def _setIdle(self) -> None:
        if any(ctx["kind"] != "load" for ctx in self._pending.values()):
            return
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False
        if not self._pending:
            self._pollTimer.stop()

    def onCancelButton(self) -> None:
        """Kill the worker: the request in flight is abandoned (the next run starts a new worker)."""
        if not self._pending:
            return
        cancelled = any(ctx["kind"] != "load" for ctx in self._pending.values())
        self._pending = {}
        self._rerunRequested = False
        self._lastAnnotateFields = None
        self.logic.stopWorker(kill=True)
        self._setIdle()
        if cancelled:
            self.ui.statusLabel.text = _("Cancelled.")

    def onPollWorker(self) -> None:
        from SegmentationDeepEditLib.slicer_bridge import route_worker_messages

        for event in route_worker_messages(self.logic.pollWorker(), self._pending):
            ctx, message = event.context, event.message
            if event.kind == "log":
                logging.info(f"SegmentationDeepEdit worker: {message['log']}")
            elif event.kind == "lost":
                for lost in event.contexts:
                    self._reportError(_("The inference worker stopped."), _(
                        "It exited with code {code} before answering; the application log has its messages.").format(
                        code=message["exited"]), lost["showErrors"])
            elif event.kind == "progress":
                if ctx["kind"] != "load":
                    self.ui.progressBar.value = int(round(100 * float(message["progress"])))
                    self.ui.progressBar.format = f"%p% {message.get('stage', '')}"
            elif event.kind == "error":
                if ctx["kind"] == "load":
                    logging.warning(f"SegmentationDeepEdit: could not preload the model: {message['error']}")
                else:
                    self._reportError(_("Segmentation failed."), message["error"], ctx["showErrors"])
            elif event.kind == "result":
                self._onResult(ctx, message["result"])
        self._setIdle()
        if self._rerunRequested and not any(c["kind"] == "annotate" for c in self._pending.values()):
            self._rerunRequested = False
            self.startAnnotation(showErrors=False)

    def _onResult(self, ctx: dict, result: dict) -> None:
        p = self._parameterNode
        if ctx["kind"] == "load":
            logging.info(f"SegmentationDeepEdit: model {result['model_id']} ready on {result['device']}")
            return
        try:
            if ctx["kind"] == "annotate":
                segmentId = self.logic.applyAnnotationResult(
                    result, ctx["volumeNode"], ctx["segmentationNode"], ctx["segmentId"], ctx["fields"],
                    segmentEditorWidget=self.segmentEditorWidget)
                outputId = p.outputSegmentation.GetID() if p and p.outputSegmentation else None
                if p and self._target.adopts(ctx["ticket"], outputId, p.segmentId):
                    p.segmentId = segmentId  # the next clicks refine it
                self.ui.statusLabel.text = AnnotationOutcome(segmentId, result).summary()
            else:
                segmentationNode = self.logic.applySegmentationResult(result, ctx["volumeNode"], ctx["segmentationNode"],
                                                                      segmentEditorWidget=self.segmentEditorWidget)
                if p:
                    p.autoOutputSegmentation = segmentationNode
                summary = _("{count} segments in {seconds:.1f} s on {device}").format(
                    count=len(result.get("segments", [])), seconds=float(result.get("seconds", {}).get("request", 0)),
                    device=str(result.get("device", "")).upper())
                self.ui.statusLabel.text = _withWarnings(summary, result)
        except Exception as e:
            self._reportError(_("The result could not be written into the segmentation."), str(e), ctx["showErrors"])

    # Batch tab

    def _sendBatch(self, planOnly: bool) -> None:
        p = self._parameterNode
        if not p or self._batchPending or not self._ensureDependencies(True):
            return
        try:
            fields = self.logic.batchFields(p, planOnly=planOnly)
            rid = self.logic.sendBatchRequest("batch_plan" if planOnly else "batch", fields)
        except Exception as e:
            self._reportBatchError(_("The batch could not start."), str(e))
            return
        self._batchPending[rid] = {"kind": "plan" if planOnly else "run", "outputDir": fields.get("output_dir")}
        if not planOnly:
            self._batchOutputDir = fields["output_dir"]
        self.ui.batchStatusLabel.text = _("Finding studies...") if planOnly else _("Running...")
        self.ui.batchProgressBar.value = 0
        self.ui.batchProgressBar.format = "%p%"
        self.ui.batchProgressBar.setVisible(True)
        for button in (self.ui.batchFindButton, self.ui.batchRunButton):
            button.enabled = False
        self.ui.batchCancelButton.enabled = True
        self._batchTimer.start()

    def onBatchFindButton(self) -> None:
        self._sendBatch(planOnly=True)

    def onBatchRunButton(self) -> None:
        self._sendBatch(planOnly=False)

    def onBatchCancelButton(self) -> None:
        """End the batch worker: finished studies stay; Run with Resume finishes the others."""
        if not self._batchPending:
            return
        self._batchPending = {}
        self.logic.stopBatchWorker(kill=True)
        self._setBatchIdle()
        self._showBatchRows(self.logic.batchTableRows(self._batchPlans, self._batchOutputDir))
        self.ui.batchStatusLabel.text = _("Cancelled. Finished studies are kept; tick Resume and press Run to finish the others.")

    def _setBatchIdle(self) -> None:
        self._batchTimer.stop()
        self.ui.batchProgressBar.setVisible(False)
        self.ui.batchCancelButton.enabled = False
        for button in (self.ui.batchFindButton, self.ui.batchRunButton):
            button.enabled = True

    def onPollBatch(self) -> None:
        from SegmentationDeepEditLib.slicer_bridge import route_worker_messages

        refresh = False
        for event in route_worker_messages(self.logic.pollBatchWorker(), self._batchPending):
            message = event.message
            if event.kind == "log":
                logging.info(f"SegmentationDeepEdit batch: {message['log']}")
            elif event.kind == "lost":
                self._reportBatchError(_("The batch worker stopped."), _(
                    "It exited with code {code}; the application log has its messages. Finished studies are kept: "
                    "run again with Resume.").format(code=message["exited"]))
            elif event.kind == "progress":
                self.ui.batchProgressBar.value = int(round(100 * float(message["progress"])))
                self.ui.batchProgressBar.format = f"%p% {message.get('stage', '')}"
                refresh = True
            elif event.kind == "error":
                self._reportBatchError(_("The batch failed."), message["error"])
            elif event.kind == "result":
                result = message["result"]
                self._batchPlans = result.get("plans", [])
                self._showBatchRows(result.get("rows", []))
                text = result.get("text", "")
                logging.info(f"SegmentationDeepEdit batch:\n{text}")
                self.ui.batchStatusLabel.text = text.splitlines()[-1] if text else ""
                refresh = False
        if refresh and self._batchOutputDir:
            self._showBatchRows(self.logic.batchTableRows(self._batchPlans, self._batchOutputDir))
        if not self._batchPending:
            self._setBatchIdle()

    def _showBatchRows(self, rows: list) -> None:
        """Fill the study table with the core's rows (study, status, sequences, seconds, qc)."""
        from SegmentationDeepEditLib.batch.report import TABLE_COLUMNS

        table = self.ui.batchTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, column in enumerate(TABLE_COLUMNS):
                item = qt.QTableWidgetItem(str(row.get(column, "")))
                item.setToolTip(str(row.get(column, "")))
                table.setItem(r, c, item)

    def onBatchLoadButton(self) -> None:
        items = self.ui.batchTable.selectedItems()
        if not items or not self._batchOutputDir:
            self.ui.batchStatusLabel.text = _("Select a finished study in the table first.")
            return
        study = self.ui.batchTable.item(items[0].row(), 0).text()
        try:
            loaded = self.logic.loadStudyForReview(self._batchOutputDir, study)
        except Exception as e:
            self._reportBatchError(_("The study could not be loaded."), str(e))
            return
        if self._parameterNode and loaded["volumes"] and loaded["segmentation"] is not None:
            self._parameterNode.inputVolume = loaded["volumes"][0]
            self._parameterNode.outputSegmentation = loaded["segmentation"]
        self.ui.batchStatusLabel.text = _("Loaded {study}: {count} volumes; correct it in the Segment Editor below.").format(
            study=study, count=len(loaded["volumes"]))

    def _reportBatchError(self, title: str, message: str) -> None:
        self._setBatchIdle()
        self.ui.batchStatusLabel.text = _("Failed: {message}").format(message=message)
        logging.error(f"SegmentationDeepEdit: {title} {message}")
        slicer.util.errorDisplay(f"{title}\n\n{message}", windowTitle=_("Segmentation DeepEdit"))

    def _reportError(self, title: str, message: str, showDialog: bool) -> None:
        """Status label always; a dialog with the core's message for actions the user started."""
        self.ui.statusLabel.text = _("Failed: {message}").format(message=message)
        logging.error(f"SegmentationDeepEdit: {title} {message}")
        if showDialog:
            slicer.util.errorDisplay(f"{title}\n\n{message}", windowTitle=_("Segmentation DeepEdit"))


#
# SegmentationDeepEditLogic
#


class AnnotationOutcome:
    """What one run produced, for the status line and for callers (tests, scripts).

    Attributes:
        segmentId: the segment that holds the result.
        result: the worker's reply (mask path, segment_name, color, device, seconds, warnings, ...).
    """

    def __init__(self, segmentId: str, result: dict) -> None:
        self.segmentId = segmentId
        self.result = result

    @property
    def seconds(self) -> float:
        s = self.result.get("seconds", {})
        return float(s.get("request", s.get("total", 0.0)))

    def summary(self) -> str:
        r = self.result
        text = _("{name}: {volume:.1f} ml in {seconds:.2f} s on {device}").format(
            name=r.get("segment_name", ""), volume=float(r.get("volume_ml", 0.0)), seconds=self.seconds,
            device=str(r.get("device", "")).upper())
        if r.get("model_loaded"):
            text += " " + _("(including loading the model)")
        return _withWarnings(text, r)


def _withWarnings(text: str, result: dict) -> str:
    """A status text followed by the worker reply's warnings (missing optional input, input unlike
    the training data, empty result...), one per line."""
    return "\n".join([text] + [str(w) for w in result.get("warnings") or []])


class SegmentationDeepEditLogic(ScriptedLoadableModuleLogic):
    """MRML nodes to core objects and back, and the worker. Can be used without the GUI widget."""

    # One worker per Slicer session, shared by every logic instance (the module's widget, the
    # Sample Data callback, the self-test), so that a model is loaded once.
    _client = None
    _batchClient = None  # the batch worker: separate, so that annotating goes on during a batch run
    _exchangeFiles = {}  # volume node ID -> (content key, file written for the worker)
    _exchangeCount = 0
    _blocking = False  # a blocking request() is reading the worker's messages
    _deferred = []  # messages a blocking request() read that belong to someone else
    _installing = False  # pip is running (its output lines let Slicer process events meanwhile)

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False

    def getParameterNode(self):
        return SegmentationDeepEditParameterNode(super().getParameterNode())

    # Dependencies

    @staticmethod
    def missingDependencies(requirements: Optional[Dict[str, str]] = None) -> List[str]:
        return missingPackages(requirements)

    def ensureDependencies(self, askConfirmation: bool = True, requirements: Optional[Dict[str, str]] = None) -> bool:
        """Make sure the core's Python packages are importable; install them after asking.

        Returns:
            True when everything is there, False when the user declined.
        """
        if self._dependenciesChecked and requirements is None:
            return True
        missing = missingPackages(requirements)
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("SegmentationDeepEdit needs these Python packages, which are not installed yet: {packages}.\n\n"
                      "Download and install them now? This may take several minutes. Without an internet "
                      "connection, install them from wheel files with pip in Slicer's Python console.").format(
                        packages=", ".join(missing)),
                    windowTitle=_("Install Python packages")):
                return False
            if SegmentationDeepEditLogic._installing:
                raise RuntimeError("the Python packages are being installed; wait for it to finish")
            # pip runs for minutes and Slicer repaints only between its output lines: say what is happening
            # (Slicer 5.12+ shows its own dialog: slicer.packaging)
            own = importlib.util.find_spec("slicer.packaging") is None
            dialog = _busyDialog(_("Installing {packages}... (this may take several minutes)").format(
                packages=", ".join(missing))) if own else None
            SegmentationDeepEditLogic._installing = True
            try:
                self.installDependencies(missing)
            finally:
                SegmentationDeepEditLogic._installing = False
                if dialog is not None:
                    dialog.close()
            still = missingPackages(requirements)
            if still:
                raise RuntimeError(f"these Python packages could not be installed: {', '.join(still)}")
        if requirements is None:
            self._dependenciesChecked = True
        return True

    @staticmethod
    def installDependencies(missing: Sequence[str]) -> None:
        """Install the given import names; torch through the PyTorch extension when it is there."""
        missing = list(missing)
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                # It picks the torch build (CUDA version or CPU) that suits this computer's GPU driver
                logging.info("SegmentationDeepEdit: installing PyTorch through the PyTorch extension")
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=REQUIREMENTS["torch"][len("torch"):])
                if torch is None:
                    raise RuntimeError("PyTorch was not installed")
                missing.remove("torch")
        if missing:
            logging.info(f"SegmentationDeepEdit: installing {', '.join(missing)}")
            slicer.util.pip_install(pipRequirements(missing))
        importlib.invalidate_caches()

    # Models

    @staticmethod
    def models(task: str) -> list:
        """Bundles of one task ("annotation" or "segmentation") the core finds; the default annotation model first."""
        from SegmentationDeepEditLib import bundle

        found = [b for b in bundle.list_bundles() if b.task == task]
        return sorted(found, key=lambda b: b.id != bundle.DEFAULT_ANNOTATION_MODEL)  # stable: the rest keep their order

    def guessInputVolumes(self, inputs: list) -> list:
        """For each declared input, the scalar volume whose name suggests it (or None)."""
        from SegmentationDeepEditLib.slicer_bridge import guess_input_volumes

        volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        return [volumes[i] if i is not None else None for i in guess_input_volumes(inputs, [v.GetName() for v in volumes])]

    @staticmethod
    def inputVolumeOf(parameterNode, tab: str, name: str):
        return parameterNode.parameterNode.GetNodeReference(f"{tab}Input.{name}") if parameterNode else None

    @staticmethod
    def setInputVolumeOf(parameterNode, tab: str, name: str, volumeNode) -> None:
        if parameterNode:
            parameterNode.parameterNode.SetNodeReferenceID(f"{tab}Input.{name}", volumeNode.GetID() if volumeNode else None)

    # The worker

    @staticmethod
    def workerCommand() -> List[str]:
        """PythonSlicer (Slicer's own Python, on PATH inside Slicer) running the worker module."""
        import shutil

        python = shutil.which("PythonSlicer")
        if not python:
            python = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if not os.path.isfile(python):
            raise RuntimeError(f"Slicer's Python executable (PythonSlicer) was not found (looked for {python})")
        return [python, "-m", WORKER_MODULE]

    @classmethod
    def worker(cls):
        """The running worker client, started if needed."""
        from SegmentationDeepEditLib.worker import WorkerClient

        client = SegmentationDeepEditLogic._client
        if client is None:
            # cwd: "python -m" finds SegmentationDeepEditLib next to this file
            client = WorkerClient(cls.workerCommand(), cwd=_MODULE_DIR, scratch_parent=slicer.app.temporaryPath)
            SegmentationDeepEditLogic._client = client
        if not client.running:
            SegmentationDeepEditLogic._exchangeFiles = {}  # a new scratch folder
            client.start()
        return client

    @staticmethod
    def workerRunning() -> bool:
        client = SegmentationDeepEditLogic._client
        return bool(client is not None and client.running)

    @staticmethod
    def _stopClient(client, kill: bool) -> None:
        if client is None:
            return
        if kill:
            client.kill()
        client.close()

    @staticmethod
    def stopWorker(kill: bool = False) -> None:
        """Stop the worker (kill: at once, for Cancel) and delete its exchange files."""
        SegmentationDeepEditLogic._stopClient(SegmentationDeepEditLogic._client, kill)
        SegmentationDeepEditLogic._exchangeFiles = {}

    @classmethod
    def batchWorker(cls):
        """The batch worker client (its own process group: Cancel also ends the study processes it started)."""
        from SegmentationDeepEditLib.worker import WorkerClient

        client = SegmentationDeepEditLogic._batchClient
        if client is None:
            client = WorkerClient(cls.workerCommand(), cwd=_MODULE_DIR, scratch_parent=slicer.app.temporaryPath,
                                  process_group=True)
            SegmentationDeepEditLogic._batchClient = client
        if not client.running:
            client.start()
        return client

    @staticmethod
    def stopBatchWorker(kill: bool = False) -> None:
        """Stop the batch worker (kill: at once, with the study processes it started)."""
        SegmentationDeepEditLogic._stopClient(SegmentationDeepEditLogic._batchClient, kill)

    def sendBatchRequest(self, op: str, fields: dict) -> int:
        return self.batchWorker().send(op, **fields)

    @staticmethod
    def pollBatchWorker() -> list:
        client = SegmentationDeepEditLogic._batchClient
        return client.poll() if client is not None else []

    @staticmethod
    def batchModels(bundles: list) -> list:
        """Automatic models a batch of brain studies can run, the default first."""
        from SegmentationDeepEditLib.batch.segment import batch_models

        return batch_models(bundles)

    @staticmethod
    def batchFields(parameterNode, planOnly: bool = False) -> dict:
        """The worker request for the Batch tab's settings (folders checked by the core)."""
        from SegmentationDeepEditLib.slicer_bridge import batch_request

        p = parameterNode
        return batch_request(p.batchInputDir, p.batchOutputDir, model=p.batchModelId, workers=p.batchWorkers,
                             resume=p.batchResume, device=p.autoDevice, mapping=p.batchMappingFile, plan_only=planOnly)

    @staticmethod
    def batchTableRows(plans: list, outputDir) -> list:
        from SegmentationDeepEditLib.batch.report import table_rows

        return table_rows(plans, outputDir)

    def loadStudyForReview(self, outputDir, study: str) -> dict:
        """Load one finished study of a batch output: its registered volumes (reference first) and segmentation.

        Returns:
            ``{"volumes": [volume nodes], "segmentation": segmentation node or None}``.
        """
        from SegmentationDeepEditLib.batch.report import review_files

        files = review_files(outputDir, study)
        volumes = [slicer.util.loadVolume(path, {"name": f"{study} {sequence}", "show": False})
                   for sequence, path in files["volumes"]]
        segmentationNode = None
        if files["segmentation"]:
            segmentationNode = slicer.util.loadSegmentation(files["segmentation"], {"name": f"{study} segmentation"})
            if volumes:
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumes[0])
        if volumes:
            slicer.util.setSliceViewerLayers(background=volumes[0], fit=True)
        return {"volumes": volumes, "segmentation": segmentationNode}

    def sendRequest(self, op: str, fields: dict) -> int:
        return self.worker().send(op, **fields)

    @staticmethod
    def pollWorker() -> list:
        """Messages and log lines from the worker since the last call (nothing while a blocking request reads them)."""
        if SegmentationDeepEditLogic._blocking:
            return []
        client = SegmentationDeepEditLogic._client
        deferred, SegmentationDeepEditLogic._deferred = SegmentationDeepEditLogic._deferred, []
        return deferred + (client.poll() if client is not None else [])

    def request(self, op: str, fields: dict, progress=None) -> dict:
        """Blocking request (scripts, self-test, Sample Data): Slicer keeps processing events meanwhile.

        Raises:
            RuntimeError: the worker's error message.
        """
        from SegmentationDeepEditLib.worker import WorkerError

        if SegmentationDeepEditLogic._blocking:
            # a nested wait (a second click while events are processed) would take the first one's reply
            raise RuntimeError("another request is still running; try again when it has finished")
        client = self.worker()

        def onMessage(message):
            if message.get("id") == rid and "progress" in message:
                if progress:
                    progress(message.get("stage", ""), float(message["progress"]))
            else:
                SegmentationDeepEditLogic._deferred.append(message)  # the widget's, read by pollWorker later

        SegmentationDeepEditLogic._blocking = True
        try:
            rid = client.send(op, **fields)
            reply = client.wait(rid, timeout=REQUEST_TIMEOUT_S, on_message=onMessage, idle=slicer.app.processEvents)
        except WorkerError as e:
            SegmentationDeepEditLogic._deferred.append({"exited": None})  # the widget's requests are lost too
            raise RuntimeError(str(e)) from None
        finally:
            SegmentationDeepEditLogic._blocking = False
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["result"]

    # Node helpers

    @staticmethod
    def configurePointsNode(pointsNode, role: str = "extreme") -> None:
        """Limit an extreme-point list to six points, so placement stops after the sixth."""
        if pointsNode is None or role != "extreme":
            return
        if pointsNode.GetMaximumNumberOfControlPoints() != NUMBER_OF_EXTREME_POINTS:
            pointsNode.SetMaximumNumberOfControlPoints(NUMBER_OF_EXTREME_POINTS)
        if pointsNode.GetRequiredNumberOfControlPoints() != NUMBER_OF_EXTREME_POINTS:
            pointsNode.SetRequiredNumberOfControlPoints(NUMBER_OF_EXTREME_POINTS)

    def createPointsNode(self, name: str = "ExtremePoints", role: str = "extreme"):
        """A point list for extreme points (yellow, at most six), + clicks (green) or - clicks (red)."""
        pointsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)  # made unique by the scene
        pointsNode.CreateDefaultDisplayNodes()
        color = {"extreme": (1.0, 0.85, 0.1), "positive": (0.1, 0.85, 0.2), "negative": (0.95, 0.2, 0.2)}[role]
        pointsNode.GetDisplayNode().SetSelectedColor(*color)
        self.configurePointsNode(pointsNode, role)
        return pointsNode

    @staticmethod
    def labelExtremePoints(pointsNode) -> None:
        """Name the points R, L, A, P, S, I in the order they were placed (the order the hint asks for)."""
        from SegmentationDeepEditLib.slicer_bridge import extreme_point_label

        for i in range(pointsNode.GetNumberOfControlPoints()):
            label = extreme_point_label(i)
            if pointsNode.GetNthControlPointLabel(i) != label:
                pointsNode.SetNthControlPointLabel(i, label)

    @staticmethod
    def createSegmentationNode(referenceVolumeNode=None):
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        if referenceVolumeNode:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        return segmentationNode

    @staticmethod
    def segmentEditorNode():
        """This module's own Segment Editor parameter node (a singleton, apart from the Segment Editor module's)."""
        node = slicer.mrmlScene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SEGMENT_EDITOR_SINGLETON_TAG)
            node = slicer.mrmlScene.AddNode(node)
        return node

    @staticmethod
    def numberOfDefinedPoints(pointsNode) -> int:
        """Points whose position is set (a point being placed, still following the mouse, is not)."""
        return pointsNode.GetNumberOfDefinedControlPoints() if pointsNode else 0

    # MRML -> core

    @staticmethod
    def checkNotTransformed(node) -> None:
        if node is not None and node.GetParentTransformNode() is not None:
            raise ValueError(
                f"'{node.GetName()}' is under a transform. Harden the transform first "
                "(Data module: right-click it, 'Harden transform'), so that the segment lands where the image is.")

    @classmethod
    def volumeNodeToImage(cls, volumeNode):
        """A scalar volume node as a SimpleITK image in LPS (pixels copied).

        Raises:
            ValueError: no image data, or the volume is under a transform.
        """
        from SegmentationDeepEditLib.slicer_bridge import image_from_volume_array

        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        cls.checkNotTransformed(volumeNode)
        return image_from_volume_array(slicer.util.arrayFromVolume(volumeNode), cls.ijkToRas(volumeNode))

    @staticmethod
    def ijkToRas(volumeNode) -> np.ndarray:
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def imageToVolumeNode(image, name: str = "Volume"):
        """A SimpleITK image (LPS) as a new scalar volume node (pixels copied)."""
        import SimpleITK as sitk
        from SegmentationDeepEditLib.slicer_bridge import ijk_to_ras_from_lps_geometry

        ijkToRas = ijk_to_ras_from_lps_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRas, name)

    def _exchangeKey(self, volumeNode) -> tuple:
        return (volumeNode.GetImageData().GetMTime() if volumeNode.GetImageData() else None,
                tuple(self.ijkToRas(volumeNode).ravel().tolist()))

    def needsExchangeFile(self, volumeNode) -> bool:
        """True when :meth:`exchangeFile` would write the volume (again), which takes a while for a large one."""
        known = SegmentationDeepEditLogic._exchangeFiles.get(volumeNode.GetID())
        return not (known and known[0] == self._exchangeKey(volumeNode) and os.path.isfile(known[1]))

    def exchangeFile(self, volumeNode) -> str:
        """The volume written for the worker (MetaImage, LPS); rewritten only when its voxels or geometry change."""
        from SegmentationDeepEditLib.worker import EXCHANGE_SUFFIX, write_exchange_image

        client = self.worker()
        key = self._exchangeKey(volumeNode)
        known = SegmentationDeepEditLogic._exchangeFiles.get(volumeNode.GetID())
        if known and known[0] == key and os.path.isfile(known[1]):
            return known[1]
        if known and os.path.isfile(known[1]):
            try:
                os.remove(known[1])
            except OSError:
                pass  # still open in the worker (Windows): removed with the scratch folder
        # A new name for new content: the worker's image cache is keyed by file
        SegmentationDeepEditLogic._exchangeCount += 1
        path = os.path.join(str(client.scratch), f"volume-{SegmentationDeepEditLogic._exchangeCount}{EXCHANGE_SUFFIX}")
        write_exchange_image(self.volumeNodeToImage(volumeNode), path)
        SegmentationDeepEditLogic._exchangeFiles[volumeNode.GetID()] = (key, path)
        return path

    def pointsLps(self, pointsNode) -> np.ndarray:
        """World positions of the placed (defined) control points, converted RAS -> LPS: (N, 3) mm."""
        from SegmentationDeepEditLib.geometry import ras_to_lps

        if pointsNode is None:
            return np.zeros((0, 3))
        pointsRas = slicer.util.arrayFromMarkupsControlPoints(pointsNode, world=True)
        defined = [i for i in range(pointsNode.GetNumberOfControlPoints())
                   if pointsNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined]
        return ras_to_lps(pointsRas[defined])

    @staticmethod
    def setPointsLps(pointsNode, pointsLps) -> None:
        """Replace a point list's points with LPS points (world coordinates)."""
        from SegmentationDeepEditLib.geometry import lps_to_ras

        if pointsNode is None:
            return
        pts = np.asarray(pointsLps, dtype=float).reshape(-1, 3)
        if len(pts) == 0:
            pointsNode.RemoveAllControlPoints()
        else:
            slicer.util.updateMarkupsControlPointsFromArray(pointsNode, lps_to_ras(pts), world=True)

    def annotationFields(self, volumeNode, pointsNode, positiveNode=None, negativeNode=None, modelId: str = "",
                         device: str = "auto", tta: bool = False, extraInputs: Optional[dict] = None) -> dict:
        """The worker's "annotate" request for these nodes (writes the volumes for the worker if needed)."""
        volumes = [volumeNode] + list((extraInputs or {}).values())
        missing = [name for name, node in (extraInputs or {}).items() if node is None]
        if missing:
            raise ValueError(f"select a volume for the model's input(s): {', '.join(missing)}")
        return {
            "images": [self.exchangeFile(v) for v in volumes],
            "points": self.pointsLps(pointsNode).tolist(),
            "positive": self.pointsLps(positiveNode).tolist(),
            "negative": self.pointsLps(negativeNode).tolist(),
            "model": modelId or None, "device": device, "tta": bool(tta),
        }

    def segmentFields(self, modelId: str, inputs: dict, device: str = "auto", tta: bool = True, fast: bool = False,
                      optional=()) -> dict:
        """The worker's "segment" request: one volume per declared input name (optional ones may be left empty).

        ``tta`` True uses the model's default test-time augmentation (flips for 3D models, all of D4
        for the slice-wise model), False none.
        """
        missing = [name for name, node in inputs.items() if node is None and name not in optional]
        if missing:
            raise ValueError(f"select a volume for the model's input(s): {', '.join(missing)}")
        return {"model": modelId, "inputs": {name: self.exchangeFile(node) for name, node in inputs.items() if node is not None},
                "device": device, "tta": None if tta else 0, "fast": bool(fast)}

    # core -> MRML

    def readMaskFor(self, path: str, volumeNode) -> np.ndarray:
        """A mask file from the worker as uint8 [k, j, i], checked to lie on the volume's grid."""
        import SimpleITK as sitk
        from SegmentationDeepEditLib.slicer_bridge import check_mask_fits_volume

        mask = sitk.ReadImage(path)
        shape = slicer.util.arrayFromVolume(volumeNode).shape
        return check_mask_fits_volume(mask, self.ijkToRas(volumeNode), shape)

    @staticmethod
    def writeMaskToSegment(maskArray: np.ndarray, segmentationNode, segmentId: str, referenceVolumeNode,
                           name: str = "Segment", color: Sequence[float] = (1.0, 1.0, 0.0),
                           terminology: Optional[str] = None, segmentEditorWidget=None, saveUndo: bool = True) -> str:
        """Replace the segment's voxels with a 0/1 mask on the reference volume's grid.

        Args:
            maskArray: uint8 [k, j, i] on the grid of ``referenceVolumeNode``.
            segmentId: segment to overwrite; if empty or missing, a new segment named ``name``
                with ``color`` (RGB 0..1) and ``terminology`` (Slicer terminology string) is added.
            segmentEditorWidget: a Segment Editor showing this segmentation saves an undo state first
                (``saveUndo``; off when the caller saved one for several segments).

        Returns:
            The id of the segment written.
        """
        SegmentationDeepEditLogic.checkNotTransformed(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        if saveUndo:  # before a segment is added, so that undo removes it too
            SegmentationDeepEditLogic.saveUndoState(segmentationNode, segmentEditorWidget)
        if segmentation.GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        if not segmentId or segmentation.GetSegment(segmentId) is None:
            segmentId = segmentation.AddEmptySegment("", name)
            segment = segmentation.GetSegment(segmentId)
            segment.SetColor(*[float(c) for c in color[:3]])
            if terminology:
                segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        slicer.util.updateSegmentBinaryLabelmapFromArray(maskArray, segmentationNode, segmentId, referenceVolumeNode)
        return segmentId

    @staticmethod
    def saveUndoState(segmentationNode, segmentEditorWidget=None) -> None:
        """Undo works on the segmentation a Segment Editor shows: save a state there, so that
        Ctrl+Z (or the Undo button) in that editor brings back what was there before a result."""
        for editor in (segmentEditorWidget, getattr(getattr(slicer.modules, "SegmentEditorWidget", None), "editor", None)):
            shownNode = editor.segmentationNode() if editor is not None else None
            if shownNode is not None and shownNode.GetID() == segmentationNode.GetID():
                editor.saveStateForUndo()

    def applyAnnotationResult(self, result: dict, volumeNode, segmentationNode, segmentId: str, fields: dict,
                              segmentEditorWidget=None) -> str:
        """Write the worker's mask into the segment and keep the clicks with it; returns the segment id.

        Only a segment made here (it keeps its clicks) is replaced; any other becomes a new segment.
        """
        from SegmentationDeepEditLib.slicer_bridge import segment_to_replace

        try:
            mask = self.readMaskFor(result["mask"], volumeNode)
        finally:
            if os.path.isfile(result["mask"]):
                os.remove(result["mask"])
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentId else None
        segmentId = segment_to_replace(segmentId, segment is not None, self._pointsTagText(segment) is not None)
        segmentId = self.writeMaskToSegment(
            mask, segmentationNode, segmentId, volumeNode, name=result["segment_name"], color=result["color"],
            terminology=result.get("terminology"), segmentEditorWidget=segmentEditorWidget)
        self.storePointsInSegment(segmentationNode, segmentId, fields["points"], fields.get("positive"),
                                  fields.get("negative"), result.get("model_id", ""))
        return segmentId

    def applySegmentationResult(self, result: dict, referenceVolumeNode, segmentationNode=None, segmentEditorWidget=None):
        """Write an automatic model's label map as named segments.

        ``result`` is the worker's reply: ``{"label": path, "segments": [{value, name, color, terminology}],
        "regions": [{name, values, color}]}``. Overlapping regions (glioma ET/TC/WT) become one segment
        each; otherwise one segment per label value. The segmentation goes into the input's study in
        the subject hierarchy.
        """
        from SegmentationDeepEditLib.slicer_bridge import segments_from_result

        try:
            label = self.readMaskFor(result["label"], referenceVolumeNode)
        finally:
            if os.path.isfile(result["label"]):
                os.remove(result["label"])
        if segmentationNode is None:
            segmentationNode = self.createSegmentationNode(referenceVolumeNode)
            segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(f"{referenceVolumeNode.GetName()} {result.get('model_id', '')}".strip()))
        segmentation = segmentationNode.GetSegmentation()
        self.saveUndoState(segmentationNode, segmentEditorWidget)  # one undo step for all the model's segments
        for spec in segments_from_result(result):
            segmentId = segmentation.GetSegmentIdBySegmentName(spec["name"])
            self.writeMaskToSegment(np.isin(label, spec["values"]).astype(np.uint8), segmentationNode, segmentId,
                                    referenceVolumeNode, name=spec["name"], color=spec["color"],
                                    terminology=spec.get("terminology"), saveUndo=False)
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(referenceVolumeNode))
        shNode.SetItemParent(shNode.GetItemByDataNode(segmentationNode), studyItem)
        return segmentationNode

    # Points kept with segments

    @staticmethod
    def storePointsInSegment(segmentationNode, segmentId: str, extreme, positive=None, negative=None, modelId: str = "") -> None:
        """Keep the clicks (LPS) in a segment tag, so that a saved scene can re-run from them."""
        from SegmentationDeepEditLib.slicer_bridge import POINTS_TAG, points_tag_value

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        segment.SetTag(POINTS_TAG, points_tag_value(np.asarray(extreme), positive, negative, modelId))

    @staticmethod
    def _pointsTagText(segment) -> Optional[str]:
        """The clicks tag of a segment (a segment made here has one), or None."""
        from SegmentationDeepEditLib.slicer_bridge import POINTS_TAG

        value = vtk.reference("")
        return value.get() if segment is not None and segment.GetTag(POINTS_TAG, value) else None

    @staticmethod
    def pointsOfSegment(segmentationNode, segmentId: str):
        """The clicks kept with a segment (SegmentPoints, LPS), or None when it has none or they are unreadable."""
        from SegmentationDeepEditLib.errors import InputError
        from SegmentationDeepEditLib.slicer_bridge import parse_points_tag

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        text = SegmentationDeepEditLogic._pointsTagText(segment)
        if text is None:
            return None
        try:
            return parse_points_tag(text)
        except InputError as e:
            logging.warning(f"SegmentationDeepEdit: segment {segmentId}: {e}")
            return None

    # Blocking use (scripts, self-test)

    def process(self, volumeNode, pointsNode, segmentationNode, segmentId: str = "", modelId: str = "",
                device: str = "auto", tta: bool = False, positiveNode=None, negativeNode=None) -> AnnotationOutcome:
        """Segment the object the six points enclose and write it into a segment (waits for the worker).

        Args:
            volumeNode: scalar volume, not under a transform.
            pointsNode: markups point list with six defined points (parent transforms are applied).
            segmentationNode: receives the result.
            segmentId: segment to overwrite; empty: a new one named after the model's label.
            modelId: annotation bundle id; empty: the core's default.
            device: "auto", "cpu" or "cuda".
            tta: test-time augmentation (flips).
            positiveNode, negativeNode: corrective clicks, for models that take them.

        Returns:
            :class:`AnnotationOutcome`.
        """
        if not volumeNode or not pointsNode or not segmentationNode:
            raise ValueError("input volume, extreme points and output segmentation are all required")
        fields = self.annotationFields(volumeNode, pointsNode, positiveNode, negativeNode, modelId=modelId,
                                       device=device, tta=tta)
        result = self.request("annotate", fields)
        segmentId = self.applyAnnotationResult(result, volumeNode, segmentationNode, segmentId, fields)
        outcome = AnnotationOutcome(segmentId, result)
        logging.info(f"SegmentationDeepEdit: {outcome.summary()}")
        return outcome

    def ensureDemoDependencies(self) -> None:
        """The core's packages and nilearn (the demo's brain template), installed after asking.

        Raises:
            RuntimeError: declined or not installed.
        """
        if not self.ensureDependencies():
            raise RuntimeError("the required Python packages are not installed")
        if not self.ensureDependencies(requirements=DEMO_REQUIREMENTS):
            raise RuntimeError("the demo case needs nilearn (its MNI152 brain template), which is not installed")

    def loadDemoCase(self, seed: int = 7, progress=None) -> dict:
        """Generate the synthetic glioma case (T1, T1c, T2, FLAIR) in the worker and load its volumes.

        Returns:
            {"volumes": {sequence: volume node}, "main": the T1c node, "truth": path of the tumour-core
            truth (MetaImage), "truthPointsLps": its six extreme points}.
        """
        self.ensureDemoDependencies()
        folder = os.path.join(slicer.app.temporaryPath, "SegmentationDeepEdit-demo")
        os.makedirs(folder, exist_ok=True)
        result = self.request("demo", {"kind": "brain", "seed": int(seed), "output_dir": folder}, progress=progress)
        volumes = {}
        for sequence, path in result["images"].items():
            volumes[sequence] = slicer.util.loadVolume(path, {"name": f"Demo{seed} {sequence.upper()}", "show": False})
        main = volumes[result["main"]]
        slicer.util.setSliceViewerLayers(background=main, fit=True)
        self.getParameterNode().inputVolume = main
        return {"volumes": volumes, "main": main, "truth": result["truth"],
                "truthPointsLps": np.asarray(result["truth_extreme_points"])}


#
# SegmentationDeepEditTest
#


class SegmentationDeepEditTest(ScriptedLoadableModuleTest):
    """Self-test: real logic, real worker, a generated brain case and six points from its truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    @classmethod
    def tearDownClass(cls):
        SegmentationDeepEditLogic.stopWorker()

    def runTest(self):
        self.setUp()
        self.test_VolumeConversionRoundTrip()
        self.setUp()
        self.test_TransformedVolumeIsRefused()
        self.setUp()
        self.test_AnnotateSyntheticCase()
        self.setUp()
        self.test_AutomaticModelRequest()
        self.setUp()
        self.test_BatchOfOneStudy()
        SegmentationDeepEditLogic.stopWorker()
        SegmentationDeepEditLogic.stopBatchWorker()

    def test_VolumeConversionRoundTrip(self):
        """A volume node read back through the conversion keeps pixels and LPS geometry."""
        import SimpleITK as sitk
        from SegmentationDeepEditLib.geometry import ras_to_lps

        self.delayDisplay("Volume node <-> SimpleITK image")
        image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
        image.SetSpacing((0.8, 1.1, 2.5))
        image.SetOrigin((10.0, -20.0, 30.0))
        angle = np.deg2rad(20)
        image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
        logic = SegmentationDeepEditLogic()
        volumeNode = logic.imageToVolumeNode(image, "RoundTrip")
        back = logic.volumeNodeToImage(volumeNode)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
        # Slicer's own idea of where voxel (1, 2, 3) is, in RAS, against ITK's in LPS
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        ras = np.array(ijkToRas.MultiplyPoint((1, 2, 3, 1))[:3])
        lps = np.array(image.TransformIndexToPhysicalPoint((1, 2, 3)))
        np.testing.assert_allclose(ras_to_lps(ras)[0], lps, atol=1e-6)
        self.delayDisplay("Test passed")

    def test_TransformedVolumeIsRefused(self):
        self.delayDisplay("A volume under a transform is refused with a clear message")
        volumeNode = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.int16))
        transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())
        with self.assertRaises(ValueError) as raised:
            SegmentationDeepEditLogic.volumeNodeToImage(volumeNode)
        self.assertIn("Harden", str(raised.exception))
        self.delayDisplay("Test passed")

    def test_AnnotateSyntheticCase(self):
        """Six points from a generated tumour's truth give a segment with Dice > 0.8; tags keep the points."""
        import SimpleITK as sitk
        from SegmentationDeepEditLib.metrics import dice

        self.delayDisplay("Annotating a synthetic brain case (demo case, worker process, CPU)")
        logic = SegmentationDeepEditLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        self.assertTrue(logic.ensureDependencies(askConfirmation=False, requirements=DEMO_REQUIREMENTS))
        demo = logic.loadDemoCase(seed=7)
        volumeNode = demo["main"]
        truth = sitk.ReadImage(demo["truth"])

        pointsNode = logic.createPointsNode()
        logic.setPointsLps(pointsNode, demo["truthPointsLps"])
        self.assertEqual(logic.numberOfDefinedPoints(pointsNode), NUMBER_OF_EXTREME_POINTS)
        segmentationNode = logic.createSegmentationNode(volumeNode)

        outcome = logic.process(volumeNode, pointsNode, segmentationNode, device="cpu")
        segmentArray = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, outcome.segmentId, volumeNode)
        score = dice(segmentArray, sitk.GetArrayFromImage(truth))
        self.delayDisplay(f"Dice {score:.3f}; {outcome.summary()}")
        self.assertGreater(score, 0.8)

        # The points are kept with the segment, in LPS
        stored = logic.pointsOfSegment(segmentationNode, outcome.segmentId)
        np.testing.assert_allclose(stored.extreme, demo["truthPointsLps"], atol=1e-3)

        # A second run (warm) overwrites the same segment rather than adding one
        outcome2 = logic.process(volumeNode, pointsNode, segmentationNode, segmentId=outcome.segmentId, device="cpu")
        self.assertEqual(outcome2.segmentId, outcome.segmentId)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertFalse(outcome2.result["model_loaded"])
        self.delayDisplay(f"Warm run: {outcome2.summary()}")

        # A segment this module did not make (painted by hand) is never overwritten: a new one is added
        handId = segmentationNode.GetSegmentation().AddEmptySegment("", "Painted by hand")
        outcome3 = logic.process(volumeNode, pointsNode, segmentationNode, segmentId=handId, device="cpu")
        self.assertNotEqual(outcome3.segmentId, handId)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 3)
        self.assertEqual(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, handId, volumeNode).sum(), 0)
        self.delayDisplay("Test passed")

    def test_AutomaticModelRequest(self):
        """The Auto-segment path: a generated glioma through the worker becomes ET/TC/WT segments."""
        self.delayDisplay("Automatic model request")
        logic = SegmentationDeepEditLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        models = {m.id: m for m in logic.models("segmentation")}
        self.assertIn("glioma-regions", models)
        demo = logic.loadDemoCase(seed=3)
        t1c, flair = demo["volumes"]["t1c"], demo["volumes"]["flair"]
        fields = logic.segmentFields("glioma-regions", {"t1c": t1c, "t2": None, "flair": flair}, device="cpu",
                                     tta=False, optional=["t2"])
        result = logic.request("segment", fields)
        segmentationNode = logic.applySegmentationResult(result, t1c)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        wt = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetSegmentIdBySegmentName("WT"), t1c)
        tc = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetSegmentIdBySegmentName("TC"), t1c)
        self.assertGreater(int(wt.sum()), 1000)
        self.assertFalse(bool((tc & ~wt.astype(bool)).any()))
        self.assertTrue(any("'t2' is missing" in w for w in result["warnings"]))
        self.delayDisplay("Test passed")

    def test_BatchOfOneStudy(self):
        """The Batch tab's path: a study folder through the batch worker, the study table, loading for review."""
        import shutil
        import tempfile

        from SegmentationDeepEditLib.slicer_bridge import batch_request

        self.delayDisplay("Batch of one generated study (registration only)")
        logic = SegmentationDeepEditLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        demo = logic.request("demo", {"kind": "brain", "seed": 5,
                                      "output_dir": tempfile.mkdtemp(dir=slicer.app.temporaryPath)})
        root = tempfile.mkdtemp(dir=slicer.app.temporaryPath)
        study = os.path.join(root, "studies", "demo-study")
        os.makedirs(study)
        for sequence in ("t1c", "t2", "flair"):
            shutil.copy(demo["images"][sequence], os.path.join(study, f"{sequence}.mha"))
        outputDir = os.path.join(root, "labelled")
        client = logic.batchWorker()
        plan = client.request("batch_plan", timeout=REQUEST_TIMEOUT_S,
                              **batch_request(os.path.join(root, "studies"), "", plan_only=True))
        self.assertEqual([r["status"] for r in plan["rows"]], ["ready"])
        fields = batch_request(os.path.join(root, "studies"), outputDir, model="none")
        result = client.request("batch", timeout=REQUEST_TIMEOUT_S, spacing_mm=2.0, **fields)
        self.assertEqual(result["exit_code"], 0)
        rows = logic.batchTableRows(plan["plans"], outputDir)
        self.assertEqual(rows[0]["status"], "done")
        loaded = logic.loadStudyForReview(outputDir, "demo-study")
        self.assertEqual(len(loaded["volumes"]), 3)
        self.assertIsNone(loaded["segmentation"])  # model "none"
        self.delayDisplay("Test passed")
