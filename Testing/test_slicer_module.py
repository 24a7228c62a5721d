"""Checks of the Slicer layer that run without Slicer.

There is no Slicer binary on our machines, so the module file is checked statically (grammar of
the Pythons Slicer ships, imports, the .ui names it uses, the CMake lists) and, with small stand-ins
for slicer/qt/vtk/ctk, imported to test its pure RAS <-> LPS geometry conversions against SimpleITK.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import struct
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SegmentationDeepEdit"
MODULE_FILE = MODULE_DIR / "SegmentationDeepEdit.py"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SegmentationDeepEdit.ui"
CORE_DIR = MODULE_DIR / "SegmentationDeepEditLib"
ICONS = [MODULE_DIR / "Resources" / "Icons" / "SegmentationDeepEdit.png", ROOT / "Resources" / "Icons" / "SegmentationDeepEdit.png"]

GUI_PACKAGES = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "SlicerPythonQt", "mrml"}
# Standard library modules that are gone in a Python that Slicer ships or will ship:
# imp, distutils, asynchat, asyncore, smtpd (3.12); the "dead batteries" of PEP 594 (3.13).
REMOVED_STDLIB = {
    "imp", "distutils", "asynchat", "asyncore", "smtpd",
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib",
    "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3",
}
SLICER_PYTHONS = [(3, 9), (3, 12)]  # Slicer 5.6-5.8 ship 3.9; Slicer 5.10 and later 3.12


def _module_source() -> str:
    return MODULE_FILE.read_text(encoding="utf-8")


def _imported_roots(tree: ast.AST) -> set:
    """Top-level package names of every import statement anywhere in the tree."""
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            # importlib.import_module("x") / __import__("x")
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def _cmake_list(text: str, variable: str) -> list:
    """Items of ``set(<variable> ...)`` in a CMake file, with ${MODULE_NAME} expanded."""
    name = re.search(r"set\(\s*MODULE_NAME\s+(\S+?)\s*\)", text).group(1)
    m = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert m, f"set({variable} ...) not found in {MODULE_CMAKE}"
    items = []
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        items += [tok.replace("${MODULE_NAME}", name) for tok in line.split()]
    return items


# --- grammar and imports -------------------------------------------------------------------------


@pytest.mark.parametrize("version", SLICER_PYTHONS, ids=lambda v: f"py{v[0]}{v[1]}")
def test_module_parses_with_slicer_python_grammar(version):
    ast.parse(_module_source(), filename=str(MODULE_FILE), feature_version=version)


def test_module_uses_no_removed_stdlib_module():
    used = _imported_roots(ast.parse(_module_source())) & REMOVED_STDLIB
    assert not used, f"{MODULE_FILE.name} imports standard library modules removed from recent Pythons: {sorted(used)}"


def test_module_annotations_evaluate_on_python_39():
    """Annotations are evaluated when a def runs: `X | None` there fails on Slicer's Python 3.9."""
    tree = ast.parse(_module_source())
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    offenders = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for a in annotations:
            if a is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(a)):
                offenders.append(f"line {a.lineno}")
    assert future or not offenders, f"PEP 604 unions in annotations (use Optional/Union): {offenders}"


def test_module_imports_no_core_or_torch_at_import_time():
    """Slicer loads the module before torch is installed: only lazy (in-function) imports of the core."""
    tree = ast.parse(_module_source())
    top_level = set()
    for node in tree.body:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                break  # a def/class at top level: its body runs later
            if isinstance(sub, ast.Import):
                top_level.update(a.name.split(".")[0] for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                top_level.add(sub.module.split(".")[0])
    heavy = top_level & {"SegmentationDeepEditLib", "torch", "monai", "safetensors", "jsonschema", "slicerio", "SimpleITK"}
    assert not heavy, f"imported when Slicer loads the module: {sorted(heavy)}"


def test_core_never_imports_slicer_qt_ctk_vtk():
    files = sorted(CORE_DIR.rglob("*.py"))
    assert files, f"no Python files under {CORE_DIR}"
    bad = {}
    for f in files:
        roots = _imported_roots(ast.parse(f.read_text(encoding="utf-8"), filename=str(f))) & GUI_PACKAGES
        if roots:
            bad[str(f.relative_to(ROOT))] = sorted(roots)
    assert not bad, f"the core must not import Slicer/Qt/VTK: {bad}"


# --- CMake lists ---------------------------------------------------------------------------------


def test_cmake_lists_exactly_the_core_python_files():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert not re.search(r"file\s*\(\s*GLOB", text, re.I), "list the files by name, no glob"
    listed = {s for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    existing = {p.relative_to(MODULE_DIR).as_posix() for p in CORE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    existing.add(MODULE_FILE.name)
    unlisted = sorted(existing - listed)
    missing = sorted(listed - existing)
    assert not unlisted and not missing, (
        f"{MODULE_CMAKE.relative_to(ROOT)} MODULE_PYTHON_SCRIPTS disagrees with the files: "
        f"existing but not listed: {unlisted}; listed but missing: {missing}")


def test_cmake_resources_exist():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    missing = [r for r in resources if not (MODULE_DIR / r).is_file()]
    assert not missing, f"listed resources that do not exist: {missing}"
    for needed in ("Resources/UI/SegmentationDeepEdit.ui", "Resources/Icons/SegmentationDeepEdit.png",
                   "SegmentationDeepEditLib/schemas/bundle.schema.json"):
        assert needed in resources, f"{needed} must be a module resource"
    # every data file of the core travels with it
    data = {p.relative_to(MODULE_DIR).as_posix() for p in CORE_DIR.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert data <= set(resources), f"core data files not listed as resources: {sorted(data - set(resources))}"


def test_cmake_installs_the_models_where_the_module_looks():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "../Resources/Models" in text and "Resources/Models" in text
    assert re.search(r"install\s*\(\s*DIRECTORY", text), "the model bundles must be installed"
    source = _module_source()
    assert '"Resources", "Models"' in source and "DEEPEDIT_MODELS_DIR" in source


def test_top_level_cmake_is_an_extension():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(r"set\(\s*" + variable + r"\s", text), f"{variable} not set"
    assert re.search(r'set\(\s*EXTENSION_CATEGORY\s+"Segmentation"\s*\)', text)
    assert re.search(r'set\(\s*EXTENSION_DEPENDS\s+"PyTorch"\s*\)', text)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SegmentationDeepEdit)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, f"missing: {line}"


# --- .ui file ------------------------------------------------------------------------------------


def _ui_widgets() -> dict:
    tree = ET.parse(UI_FILE)  # raises on malformed XML
    return {w.get("name"): w for w in tree.iter("widget")}


def test_ui_has_every_widget_the_module_uses():
    names = set(_ui_widgets())
    used = set(re.findall(r"self\.ui\.(\w+)", _module_source()))
    assert used, "the module uses no self.ui widgets?"
    assert not used - names, f"widgets used in {MODULE_FILE.name} but missing from {UI_FILE.name}: {sorted(used - names)}"


def test_ui_parameter_names_match_the_parameter_node():
    tree = ast.parse(_module_source())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("ParameterNode"))
    parameters = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    assert bound, "no widget is bound to the parameter node"
    unknown = {w: p for w, p in bound.items() if p not in parameters}
    assert not unknown, f"SlicerParameterName values with no parameter: {unknown}"


def test_ui_mrml_widgets_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget").get("name")
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {n for n, w in _ui_widgets().items() if w.get("class", "").startswith(("qMRML", "qSlicer")) and n != top}
    assert mrml <= receivers, f"MRML widgets without a setMRMLScene connection: {sorted(mrml - receivers)}"


# --- icons ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ICONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_icon_is_a_128_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


# --- the module imported with stand-ins for Slicer -----------------------------------------------


class _Anything:
    """Stand-in base class / decorator / factory: accepts any use at import time."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if args and isinstance(args[0], type) else self


def _stub_modules() -> dict:
    slicer = types.ModuleType("slicer")
    slicer.__path__ = []  # a package, so that "slicer.x" submodules resolve
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLSegmentationNode",
                 "vtkMRMLMarkupsNode", "qSlicerMarkupsPlaceWidget"):
        setattr(slicer, name, type(name, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    names = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"]
    for name in names:
        setattr(slm, name, type(name, (), {}))
    slm.__all__ = names
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {})
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = _Anything
    slicer.i18n, slicer.ScriptedLoadableModule, slicer.util, slicer.parameterNodeWrapper = i18n, slm, util, pnw
    return {
        "slicer": slicer, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": slm, "slicer.util": util,
        "slicer.parameterNodeWrapper": pnw,
        "qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk"), "ctk": types.ModuleType("ctk"),
    }


@pytest.fixture
def slicer_module(monkeypatch):
    """The module file imported with Slicer stand-ins, torch and MONAI made unimportable, and the core
    forgotten, so that any import-time dependency on them fails here."""
    for name, module in _stub_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("torch", "monai"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torch` now raises ImportError
    for name in [n for n in sys.modules if n == "SegmentationDeepEditLib" or n.startswith("SegmentationDeepEditLib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("SegmentationDeepEdit_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not [n for n in sys.modules if n.startswith("SegmentationDeepEditLib")], \
        "importing the module imported the core"
    return module


def test_module_imports_without_slicer_torch_or_core(slicer_module):
    for cls in ("SegmentationDeepEdit", "SegmentationDeepEditWidget", "SegmentationDeepEditLogic", "SegmentationDeepEditTest"):
        assert hasattr(slicer_module, cls)


def _oblique_image():
    import SimpleITK as sitk

    image = sitk.Image(7, 5, 4, sitk.sitkInt16)
    image.SetSpacing((0.7, 1.3, 3.0))
    image.SetOrigin((12.5, -40.0, 7.25))
    rotation = sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()  # a proper rotation, all axes oblique
    image.SetDirection(rotation)
    return image


def test_ijk_to_ras_matches_simpleitk(slicer_module):
    """Slicer's IJK->RAS built from the ITK geometry puts every voxel where ITK does (x, y negated)."""
    image = _oblique_image()
    m = slicer_module.ijkToRASFromLpsGeometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    for index in [(0, 0, 0), (6, 0, 0), (0, 4, 0), (0, 0, 3), (6, 4, 3), (3, 2, 1)]:
        ras = (m @ np.array([*index, 1.0]))[:3]
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)


def test_lps_geometry_round_trip(slicer_module):
    image = _oblique_image()
    m = slicer_module.ijkToRASFromLpsGeometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    spacing, origin, direction = slicer_module.lpsGeometryFromIJKToRAS(m)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-9)


def test_slicer_default_volume_is_lps_flipped(slicer_module):
    """Slicer's default IJK->RAS for a DICOM-like axial volume is diag(-s, -s, s): identity direction in LPS."""
    spacing, origin, direction = slicer_module.lpsGeometryFromIJKToRAS(np.diag([-0.5, -0.5, 2.0, 1.0]))
    np.testing.assert_allclose(spacing, (0.5, 0.5, 2.0))
    np.testing.assert_allclose(direction, np.eye(3).reshape(-1))
    np.testing.assert_allclose(origin, (0.0, 0.0, 0.0), atol=0)


def test_zero_spacing_is_refused(slicer_module):
    with pytest.raises(ValueError, match="zero spacing"):
        slicer_module.lpsGeometryFromIJKToRAS(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_pip_requirements_pin_slicer_owned_packages(slicer_module):
    """Installing the core's packages never moves numpy or SimpleITK: they are pinned as installed."""
    import importlib.metadata

    args = slicer_module.pipRequirements(["monai", "jsonschema"])
    assert "monai>=1.3" in args and "jsonschema>=4.0" in args
    assert f"numpy=={importlib.metadata.version('numpy')}" in args
    assert not any(a.split("=")[0].split(">")[0].lower() in ("vtk",) for a in args)
    assert set(slicer_module.REQUIREMENTS) == {"torch", "monai", "safetensors", "jsonschema", "slicerio"}
