"""SegmentationDeepEdit: the Slicer module (widget wiring and MRML <-> core conversion only).

Everything that decides something lives in the pure core package ``SegmentationDeepEditLib``,
which is imported lazily inside functions: it needs torch and MONAI, which may not be
installed yet when Slicer loads this file.

Coordinates: Slicer works in RAS, the core in LPS (ITK). The conversion happens here, at the
edge, and only here: x and y change sign. Arrays from ``slicer.util.arrayFromVolume`` and from
``SimpleITK.GetArrayFromImage`` are both indexed [k, j, i].
"""

import importlib.util
import logging
import os
import sys
import time
from typing import Annotated, List, Optional, Sequence, Tuple

import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

# So that ``import SegmentationDeepEditLib`` works when the module is loaded from the source
# tree through "Additional module paths" (an installed module's folder is on sys.path already).
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

# Installed, the bundles sit in <module dir>/Resources/Models (see CMakeLists.txt), where the
# core does not look by itself; from the source tree the core finds <repo>/Resources/Models.
# Folders the user has set come first, so their own bundles win over ours.
_INSTALLED_MODELS_DIR = os.path.join(_MODULE_DIR, "Resources", "Models")
if os.path.isdir(_INSTALLED_MODELS_DIR):
    _dirs = [d for d in os.environ.get("DEEPEDIT_MODELS_DIR", "").split(os.pathsep) if d]
    if _INSTALLED_MODELS_DIR not in _dirs:
        os.environ["DEEPEDIT_MODELS_DIR"] = os.pathsep.join(_dirs + [_INSTALLED_MODELS_DIR])

NUMBER_OF_EXTREME_POINTS = 6
AUTO_UPDATE_DELAY_MS = 300  # wait this long after the last point move before re-running

# Python packages the core needs beyond what Slicer ships (numpy, SimpleITK, vtk are never
# installed or upgraded from here). Import name -> pip requirement.
REQUIREMENTS = {
    "torch": "torch>=2.0",
    "monai": "monai>=1.3",
    "safetensors": "safetensors>=0.4",
    "jsonschema": "jsonschema>=4.0",
    "slicerio": "slicerio>=1.0",
}
# Distributions that Slicer itself ships: pinned to the installed version in every pip call,
# so that pip can only fail, never replace them.
SLICER_OWNED_DISTRIBUTIONS = ("numpy", "SimpleITK")


#
# Pure conversions (numpy only; tested by Testing/test_slicer_module.py without Slicer)
#


def lpsGeometryFromIJKToRAS(ijkToRas: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """Split a Slicer IJK-to-RAS matrix into ITK geometry.

    Args:
        ijkToRas: 4x4 matrix mapping voxel index [i, j, k, 1] to RAS mm.

    Returns:
        (spacing (i, j, k) mm, origin LPS mm, direction as a row-major 9-tuple whose column c
        is the LPS direction of index axis c), as SimpleITK's SetSpacing/SetOrigin/SetDirection take them.
    """
    m = np.asarray(ijkToRas, dtype=float).reshape(4, 4)
    rasToLpsMatrix = np.diag([-1.0, -1.0, 1.0])
    linear = rasToLpsMatrix @ m[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"the volume's IJK to RAS matrix has a zero spacing: {m[:3, :3].tolist()}")
    direction = linear / spacing
    origin = rasToLpsMatrix @ m[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.reshape(-1).tolist())


def ijkToRASFromLpsGeometry(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The inverse of :func:`lpsGeometryFromIJKToRAS`: ITK geometry (LPS) to a 4x4 IJK-to-RAS matrix."""
    lpsToRasMatrix = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = lpsToRasMatrix @ np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=float))
    m[:3, 3] = lpsToRasMatrix @ np.asarray(origin, dtype=float)
    return m


def missingPackages() -> List[str]:
    """Import names from REQUIREMENTS that cannot be found (found is not imported: torch is slow to import)."""
    return [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


def pipRequirements(missing: Sequence[str]) -> List[str]:
    """pip arguments that install ``missing`` (import names) while holding Slicer's own packages fixed."""
    import importlib.metadata

    args = [REQUIREMENTS[name] for name in missing]
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
Move a point and the segment is computed again. The result is an ordinary segment: edit it in
Segment Editor.
""")
        self.parent.acknowledgementText = _("""
The method follows Deep Extreme Cut (DExtr3D) with a SegResNet network (Myronenko 2018), built on
MONAI and PyTorch.
""")


#
# SegmentationDeepEditParameterNode
#


@parameterNodeWrapper
class SegmentationDeepEditParameterNode:
    """State of the module, saved with the scene.

    inputVolume - the image to segment.
    extremePoints - six control points on the object's extremes (any coordinate system; world positions are used).
    outputSegmentation - where the result goes; created on first run if not set.
    segmentId - the segment the result replaces; empty: a new segment is added.
    modelId - id of the annotation model bundle; empty: the core's default.
    device - "auto" (CUDA when present, else CPU), "cpu" or "cuda".
    tta - average the prediction over flips (slower, slightly smoother).
    autoUpdate - run when the sixth point is placed and whenever a point is moved.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    extremePoints: vtkMRMLMarkupsFiducialNode
    outputSegmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    modelId: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    tta: bool = False
    autoUpdate: bool = True


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
        self._observedPointsNode = None
        self._running = False
        self._autoUpdateTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegmentationDeepEdit.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegmentationDeepEditLogic()

        self.ui.pointsPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.pointsPlaceWidget.buttonsVisible = True

        # A new markups node made from the selector gets the six-point limit at once
        self.ui.pointsSelector.connect("nodeAddedByUser(vtkMRMLNode*)", self.logic.configurePointsNode)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentSelected)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)

        # One single-shot timer: every point event restarts it, so a drag runs once it pauses
        self._autoUpdateTimer = qt.QTimer()
        self._autoUpdateTimer.setSingleShot(True)
        self._autoUpdateTimer.setInterval(AUTO_UPDATE_DELAY_MS)
        self._autoUpdateTimer.connect("timeout()", self.onAutoUpdateTimeout)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._autoUpdateTimer:
            self._autoUpdateTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Points moved while another module is shown do not re-run; the GUI is refreshed on enter
        self._observePointsNode(None)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onReload(self) -> None:
        """Reload the module and the core package (forgotten here, re-imported on next use)."""
        for name in [n for n in sys.modules if n == "SegmentationDeepEditLib" or n.startswith("SegmentationDeepEditLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.extremePoints:
            # Ready to click: the user only has to press "place"
            self._parameterNode.extremePoints = self.logic.createPointsNode()
        if not self._parameterNode.modelId and self.ui.modelComboBox.enabled:
            self.onModelSelected(self.ui.modelComboBox.currentIndex)

    def setParameterNode(self, inputParameterNode: Optional[SegmentationDeepEditParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" property in the .ui are bound here
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Sync the widgets that are not bound by connectGui, and the point observations."""
        p = self._parameterNode
        pointsNode = p.extremePoints if p else None
        self._observePointsNode(pointsNode)
        self.ui.pointsPlaceWidget.setCurrentNode(pointsNode)

        segmentationNode = p.outputSegmentation if p else None
        wasBlocked = self.ui.segmentSelector.blockSignals(True)
        self.ui.segmentSelector.setCurrentNode(segmentationNode)
        self.ui.segmentSelector.setCurrentSegmentID(p.segmentId if p else "")
        self.ui.segmentSelector.blockSignals(wasBlocked)

        if p:
            index = self.ui.modelComboBox.findData(p.modelId) if p.modelId else -1
            if index >= 0 and index != self.ui.modelComboBox.currentIndex:
                wasBlocked = self.ui.modelComboBox.blockSignals(True)
                self.ui.modelComboBox.currentIndex = index
                self.ui.modelComboBox.blockSignals(wasBlocked)
        self._checkCanApply()

    def _observePointsNode(self, pointsNode) -> None:
        if pointsNode is self._observedPointsNode:
            return
        if self._observedPointsNode:
            for event in (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                          slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                          slicer.vtkMRMLMarkupsNode.PointRemovedEvent):
                self.removeObserver(self._observedPointsNode, event, self.onPointsModified)
        self._observedPointsNode = pointsNode
        if pointsNode:
            self.logic.configurePointsNode(pointsNode)
            # PointPositionDefinedEvent: a point was placed (the sixth one starts a run);
            # PointModifiedEvent: a point moved (also fires, with preview status, while placing).
            for event in (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                          slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                          slicer.vtkMRMLMarkupsNode.PointRemovedEvent):
                self.addObserver(pointsNode, event, self.onPointsModified)

    def onPointsModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        p = self._parameterNode
        if not p or not p.autoUpdate or self._running:
            return
        if self.logic.numberOfDefinedPoints(p.extremePoints) == NUMBER_OF_EXTREME_POINTS and p.inputVolume:
            self._autoUpdateTimer.start()

    def onAutoUpdateTimeout(self) -> None:
        p = self._parameterNode
        if not p or not p.autoUpdate or not self._canApply():
            return
        self.runAnnotation()

    def onSegmentSelected(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.segmentId = segmentId or ""

    def onModelSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(index) or ""

    def populateModels(self) -> None:
        """Fill the model selector from the annotation bundles the core finds."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            bundles = self.logic.annotationModels()
        except ImportError as e:
            # The core reads bundle metadata with jsonschema, which may not be installed yet
            logging.info(f"SegmentationDeepEdit: models not listed yet ({e})")
            bundles = None
        except Exception as e:
            logging.warning(f"SegmentationDeepEdit: could not list the models: {e}")
            bundles = []
        if bundles is None:
            combo.addItem(_("(press Segment to install the required Python packages)"), "")
            combo.enabled = False
        elif not bundles:
            combo.addItem(_("(no annotation model found)"), "")
            combo.enabled = False
        else:
            for b in bundles:
                combo.addItem(b.name, b.id)
                combo.setItemData(combo.count - 1, b.description, qt.Qt.ToolTipRole)
            combo.enabled = True
        combo.blockSignals(wasBlocked)
        if self._parameterNode:
            index = combo.findData(self._parameterNode.modelId) if self._parameterNode.modelId else -1
            combo.currentIndex = max(index, 0)
            self.onModelSelected(combo.currentIndex)

    def _canApply(self) -> bool:
        p = self._parameterNode
        return bool(p and p.inputVolume and p.extremePoints
                    and self.logic.numberOfDefinedPoints(p.extremePoints) == NUMBER_OF_EXTREME_POINTS)

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
        self.runAnnotation(showErrorDialog=True)

    def runAnnotation(self, showErrorDialog: bool = False) -> None:
        """Run the model on the current points and show how it went in the status label.

        Errors from the button open a dialog; errors from an automatic update (while the user
        drags points) go to the status label only, so that a drag does not raise a dialog storm.
        """
        if self._running:
            return
        p = self._parameterNode
        self._running = True
        self.ui.statusLabel.text = _("Segmenting...")
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), show=showErrorDialog, waitCursor=True):
                if not self.logic.ensureDependencies():
                    self.ui.statusLabel.text = _("The required Python packages are not installed.")
                    return
                if not self.ui.modelComboBox.enabled:
                    self.populateModels()  # packages may have just been installed
                if not p.outputSegmentation:
                    p.outputSegmentation = self.logic.createSegmentationNode(p.inputVolume)
                outcome = self.logic.process(
                    p.inputVolume, p.extremePoints, p.outputSegmentation, segmentId=p.segmentId,
                    modelId=p.modelId, device=p.device, tta=p.tta)
                p.segmentId = outcome.segmentId
                self.ui.statusLabel.text = outcome.summary()
        except Exception as e:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=str(e))
            if showErrorDialog:
                raise
            logging.error(f"SegmentationDeepEdit automatic update failed: {e}")
        finally:
            self._running = False


#
# SegmentationDeepEditLogic
#


class AnnotationOutcome:
    """What one run produced, for the status line and for callers (tests, scripts).

    Attributes:
        segmentId: the segment that holds the result.
        result: the core's AnnotationResult (mask, device, seconds, segment_name, color, warnings).
    """

    def __init__(self, segmentId: str, result) -> None:
        self.segmentId = segmentId
        self.result = result

    @property
    def seconds(self) -> float:
        s = self.result.seconds
        return float(s.get("total", sum(s.values()))) if isinstance(s, dict) else float(s)

    def summary(self) -> str:
        r = self.result
        volume = getattr(r, "volume_ml", None)
        text = _("{name}: {volume} in {seconds:.2f} s on {device}").format(
            name=r.segment_name,
            volume=(f"{volume:.1f} ml" if volume is not None else "done"),
            seconds=self.seconds,
            device=str(r.device).upper())
        warnings = list(getattr(r, "warnings", []) or [])
        if warnings:
            text += "\n" + "\n".join(warnings)
        return text


class SegmentationDeepEditLogic(ScriptedLoadableModuleLogic):
    """MRML nodes to core objects and back. Can be used without the GUI widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False

    def getParameterNode(self):
        return SegmentationDeepEditParameterNode(super().getParameterNode())

    # Dependencies

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Make sure the core's Python packages are importable; install them after asking.

        Returns:
            True when everything is there, False when the user declined.
        """
        if self._dependenciesChecked:
            return True
        missing = missingPackages()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("SegmentationDeepEdit needs these Python packages, which are not installed yet: {packages}.\n\n"
                      "Download and install them now? This may take several minutes.").format(packages=", ".join(missing)),
                    windowTitle=_("Install Python packages")):
                return False
            self.installDependencies(missing)
            still = missingPackages()
            if still:
                raise RuntimeError(f"these Python packages could not be installed: {', '.join(still)}")
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
    def annotationModels() -> list:
        """Annotation bundles (objects with .id, .name, .description, .task) the core finds, its default first."""
        from SegmentationDeepEditLib import bundle

        default = getattr(bundle, "DEFAULT_ANNOTATION_MODEL", None)
        models = [b for b in bundle.list_bundles() if b.task == "annotation"]
        return sorted(models, key=lambda b: b.id != default)  # stable: the rest keep the core's order

    # Node helpers

    @staticmethod
    def configurePointsNode(pointsNode) -> None:
        """Limit a point list to six points, so placement stops after the sixth."""
        if pointsNode is None:
            return
        if pointsNode.GetMaximumNumberOfControlPoints() != NUMBER_OF_EXTREME_POINTS:
            pointsNode.SetMaximumNumberOfControlPoints(NUMBER_OF_EXTREME_POINTS)
        if pointsNode.GetRequiredNumberOfControlPoints() != NUMBER_OF_EXTREME_POINTS:
            pointsNode.SetRequiredNumberOfControlPoints(NUMBER_OF_EXTREME_POINTS)

    def createPointsNode(self, name: str = "ExtremePoints"):
        pointsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)  # made unique by the scene
        pointsNode.CreateDefaultDisplayNodes()
        self.configurePointsNode(pointsNode)
        return pointsNode

    @staticmethod
    def createSegmentationNode(referenceVolumeNode=None):
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        if referenceVolumeNode:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        return segmentationNode

    @staticmethod
    def numberOfDefinedPoints(pointsNode) -> int:
        """Points whose position is set (a point being placed, still following the mouse, is not)."""
        return pointsNode.GetNumberOfDefinedControlPoints() if pointsNode else 0

    # MRML -> core

    @staticmethod
    def checkNotTransformed(volumeNode) -> None:
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(
                f"The volume '{volumeNode.GetName()}' is under a transform. Harden the transform first "
                "(Data module: right-click the volume, 'Harden transform'), so that the segment lands where the image is.")

    @classmethod
    def volumeNodeToImage(cls, volumeNode):
        """A scalar volume node as a SimpleITK image in LPS (pixels copied).

        Raises:
            ValueError: no image data, or the volume is under a transform.
        """
        import SimpleITK as sitk

        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        cls.checkNotTransformed(volumeNode)
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)  # [k, j, i]
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        spacing, origin, direction = lpsGeometryFromIJKToRAS(slicer.util.arrayFromVTKMatrix(ijkToRas))
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        return image

    @staticmethod
    def imageToVolumeNode(image, name: str = "Volume"):
        """A SimpleITK image (LPS) as a new scalar volume node (pixels copied)."""
        import SimpleITK as sitk

        ijkToRas = ijkToRASFromLpsGeometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRas, name)

    @staticmethod
    def controlPointsLps(pointsNode) -> np.ndarray:
        """World positions of the placed (defined) control points, converted RAS -> LPS: (N, 3) mm."""
        from SegmentationDeepEditLib.geometry import ras_to_lps

        pointsRas = slicer.util.arrayFromMarkupsControlPoints(pointsNode, world=True)
        defined = [i for i in range(pointsNode.GetNumberOfControlPoints())
                   if pointsNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined]
        return ras_to_lps(pointsRas[defined])

    # core -> MRML

    @staticmethod
    def writeMaskToSegment(maskArray: np.ndarray, segmentationNode, segmentId: str, referenceVolumeNode,
                           name: str = "Segment", color: Sequence[float] = (1.0, 1.0, 0.0)) -> str:
        """Replace the segment's voxels with a 0/1 mask on the reference volume's grid.

        Args:
            maskArray: uint8 [k, j, i] on the grid of ``referenceVolumeNode``.
            segmentId: segment to overwrite; if empty or missing, a new segment named ``name``
                with ``color`` (RGB 0..1) is added.

        Returns:
            The id of the segment written.
        """
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        if not segmentId or segmentation.GetSegment(segmentId) is None:
            segmentId = segmentation.AddEmptySegment("", name)
            segmentation.GetSegment(segmentId).SetColor(*[float(c) for c in color[:3]])
        # Segment Editor's undo works on the segmentation it shows: save a state there when
        # it shows this one, so Ctrl+Z in Segment Editor brings back the previous result.
        segmentEditorWidget = getattr(slicer.modules, "SegmentEditorWidget", None)
        editor = getattr(segmentEditorWidget, "editor", None)
        shownNode = editor.segmentationNode() if editor is not None else None
        if shownNode is not None and shownNode.GetID() == segmentationNode.GetID():
            editor.saveStateForUndo()
        slicer.util.updateSegmentBinaryLabelmapFromArray(maskArray, segmentationNode, segmentId, referenceVolumeNode)
        return segmentId

    def process(self, volumeNode, pointsNode, segmentationNode, segmentId: str = "", modelId: str = "",
                device: str = "auto", tta: bool = False) -> AnnotationOutcome:
        """Segment the object the six points enclose and write it into a segment.

        Args:
            volumeNode: scalar volume, not under a transform.
            pointsNode: markups point list with six defined points (parent transforms are applied).
            segmentationNode: receives the result.
            segmentId: segment to overwrite; empty: a new one named after the model's label.
            modelId: annotation bundle id; empty: the core's default.
            device: "auto", "cpu" or "cuda".
            tta: test-time augmentation (flips).

        Returns:
            :class:`AnnotationOutcome`.
        """
        import SimpleITK as sitk
        from SegmentationDeepEditLib.annotate import annotate

        if not volumeNode or not pointsNode or not segmentationNode:
            raise ValueError("input volume, extreme points and output segmentation are all required")
        image = self.volumeNodeToImage(volumeNode)
        pointsLps = self.controlPointsLps(pointsNode)
        start = time.perf_counter()
        result = annotate(image, pointsLps, model=modelId or None, device=device, tta=tta)
        mask = sitk.GetArrayFromImage(result.mask).astype(np.uint8)
        segmentId = self.writeMaskToSegment(
            mask, segmentationNode, segmentId, volumeNode, name=result.segment_name, color=result.color)
        logging.info(f"SegmentationDeepEdit: {result.segment_name} on {result.device} "
                     f"in {time.perf_counter() - start:.2f} s (including writing the segment)")
        return AnnotationOutcome(segmentId, result)


#
# SegmentationDeepEditTest
#


class SegmentationDeepEditTest(ScriptedLoadableModuleTest):
    """Self-test: a generated brain case, six points taken from its truth, the real model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_VolumeConversionRoundTrip()
        self.setUp()
        self.test_TransformedVolumeIsRefused()
        self.setUp()
        self.test_AnnotateSyntheticCase()

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
        """Six points from a generated tumour's truth give a segment with Dice > 0.8."""
        self.delayDisplay("Annotating a synthetic brain case")
        logic = SegmentationDeepEditLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        if importlib.util.find_spec("nilearn") is None:
            # Synthetic brain cases start from the MNI152 template that ships inside nilearn's wheel
            slicer.util.pip_install(["nilearn>=0.10"] + pipRequirements([]))
            importlib.invalidate_caches()

        from SegmentationDeepEditLib import synthetic
        from SegmentationDeepEditLib.geometry import lps_to_ras
        from SegmentationDeepEditLib.metrics import dice
        from SegmentationDeepEditLib.points import extreme_points_from_mask
        import SimpleITK as sitk

        case = synthetic.make_brain_case(7)
        image = case.images["t1c"]
        truth = synthetic.tumour_core_mask(case.label, "brain")
        volumeNode = logic.imageToVolumeNode(image, "SyntheticT1c")
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)

        pointsNode = logic.createPointsNode()
        slicer.util.updateMarkupsControlPointsFromArray(pointsNode, lps_to_ras(extreme_points_from_mask(truth)))
        self.assertEqual(logic.numberOfDefinedPoints(pointsNode), NUMBER_OF_EXTREME_POINTS)
        segmentationNode = logic.createSegmentationNode(volumeNode)

        outcome = logic.process(volumeNode, pointsNode, segmentationNode, device="auto")
        segmentArray = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, outcome.segmentId, volumeNode)
        score = dice(segmentArray, sitk.GetArrayFromImage(truth))
        self.delayDisplay(f"Dice {score:.3f}; {outcome.summary()}")
        self.assertGreater(score, 0.8)

        # A second run with a point moved overwrites the same segment rather than adding one
        outcome2 = logic.process(volumeNode, pointsNode, segmentationNode, segmentId=outcome.segmentId)
        self.assertEqual(outcome2.segmentId, outcome.segmentId)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Test passed")
