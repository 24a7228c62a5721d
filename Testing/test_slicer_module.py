"""Checks of the Slicer layer that run without Slicer.

There is no Slicer binary on our machines, so the module file is checked statically: grammar of
the Pythons Slicer ships, imports, the .ui names it uses, the CMake lists, and every Slicer, Qt,
CTK, VTK and MRML name it uses against the list of names verified in Slicer's source
(``SegmentationDeepEdit/Resources/SlicerAPIs.txt``). With small stand-ins for slicer/qt/vtk/ctk
it is also imported, to prove that loading it needs neither torch nor the core. The conversions
the module relies on (RAS/LPS, geometry, points tags) are tested in test_slicer_bridge.py.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import importlib.util
import inspect
import re
import struct
import sys
import types
import unittest
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
API_LIST = MODULE_DIR / "Resources" / "SlicerAPIs.txt"
TESTING_CMAKE = MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt"
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
    shots = re.search(r'set\(\s*EXTENSION_SCREENSHOTURLS\s+"([^"]+)"', text).group(1).split()
    for url in shots:  # each picture the Extension Manager shows is a file of this repository
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url
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
    slicer.app = types.SimpleNamespace(connect=lambda *args: None)
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
    pnw.WithinRange = _Anything
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


def test_pip_requirements_pin_slicer_owned_packages(slicer_module):
    """Installing the core's packages never moves numpy or SimpleITK: they are pinned as installed."""
    import importlib.metadata

    args = slicer_module.pipRequirements(["monai", "jsonschema"])
    assert "monai>=1.3" in args and "jsonschema>=4.0" in args
    assert f"numpy=={importlib.metadata.version('numpy')}" in args
    assert not any(a.split("=")[0].split(">")[0].lower() in ("vtk",) for a in args)
    assert set(slicer_module.REQUIREMENTS) == {"torch", "monai", "safetensors", "jsonschema", "slicerio"}


# --- self-test registration ----------------------------------------------------------------------


def test_self_test_is_registered_with_ctest():
    """slicer_add_python_unittest for the module file, reached from the module's CMake under BUILD_TESTING."""
    module_cmake = MODULE_CMAKE.read_text(encoding="utf-8")
    guarded = re.search(r"if\s*\(\s*BUILD_TESTING\s*\)(.*?)endif\s*\(", module_cmake, re.S)
    assert guarded and "add_subdirectory(Testing)" in guarded.group(1)
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")
    text = TESTING_CMAKE.read_text(encoding="utf-8")
    m = re.search(r"^\s*slicer_add_python_unittest\(\s*SCRIPT\s+(\S+)\s*\)", text, re.M)
    assert m, "no active slicer_add_python_unittest(SCRIPT ...) line"
    script = m.group(1).replace("${CMAKE_CURRENT_SOURCE_DIR}", str(TESTING_CMAKE.parent)).replace("${MODULE_NAME}", MODULE_FILE.stem)
    assert Path(script).resolve() == MODULE_FILE.resolve()
    assert len(re.findall(r"slicer_add_python_unittest", module_cmake + text)) == 1, "registered twice: duplicate ctest name"


def test_self_test_runs_the_logic_and_an_automatic_model():
    tree = ast.parse(_module_source())
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentationDeepEditTest")
    methods = {f.name: ast.unparse(f) for f in test_class.body if isinstance(f, ast.FunctionDef)}
    run = methods["runTest"]
    for name in [m for m in methods if m.startswith("test_")]:
        assert f"self.{name}()" in run, f"runTest does not run {name}"
    assert "logic.process(" in methods["test_AnnotateSyntheticCase"] and "dice(" in methods["test_AnnotateSyntheticCase"]
    assert "assertGreater(score" in methods["test_AnnotateSyntheticCase"]
    assert re.search(r"[\"']segment[\"']", methods["test_AutomaticModelRequest"])


# --- wiring that must not regress ----------------------------------------------------------------


def test_module_runs_inference_in_the_worker_not_in_slicer():
    """The module never imports the inference code (torch) itself: it talks to the worker."""
    roots = set()
    for node in ast.walk(ast.parse(_module_source())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SegmentationDeepEditLib"):
            roots.add(node.module)
    assert "SegmentationDeepEditLib.annotate" not in roots and "SegmentationDeepEditLib.device" not in roots
    assert "SegmentationDeepEditLib.worker" in roots
    assert '"SegmentationDeepEditLib.worker"' in _module_source()


def test_module_decides_nothing_the_core_could():
    """No numpy arithmetic on geometry in the module: RAS/LPS, IJK-to-RAS splits, tags live in slicer_bridge."""
    source = _module_source()
    for pattern in (r"np\.diag\(", r"np\.linalg", r"json\.dumps", r"json\.loads", r"\* *-1", r"\[-1, *-1, *1\]"):
        assert not re.search(pattern, source), f"the module computes something ({pattern}); move it to the core"


# --- Slicer API names ----------------------------------------------------------------------------

# Roots whose attributes are Slicer (or Qt/CTK/VTK through Slicer's Python, or Slicer modules) API
SLICER_ROOTS = {"slicer", "qt", "ctk", "vtk", "SampleData", "PyTorchUtils"}


def _attribute_chain(node):
    """["a", "b", "c"] for the expression a.b.c (None when it does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _imports(tree):
    """Local name -> dotted origin for every import in the module (star imports aside)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if a.name != "*":
                    names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _bound_names(tree):
    """Every name the module binds anywhere (functions, classes, variables, parameters)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _own_names(tree):
    """Attribute names the module itself defines: functions and classes, names assigned in a class
    body or at module level, and attributes it assigns on self or its classes. Local variables do not
    count: an attribute named like a local variable is still checked."""
    classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"} | classes:
            # only self.x = ... defines a name; widget.x = ... sets a (checked) Qt property
            names.add(node.attr)
    for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        for stmt in scope.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _library_names():
    """Attributes of Python's own types, numpy arrays, SimpleITK images and unittest's TestCase."""
    import SimpleITK as sitk

    names = set(dir(builtins))
    for t in (str, bytes, list, dict, set, tuple, object, int, float, Exception, np.ndarray, np.generic,
              sitk.Image, unittest.TestCase):
        names |= set(dir(t))
    names.add("exception")  # set on assertRaises' context manager when the block raises
    return names


def _core_names(tree):
    """Everything the core modules the module imports define, including dataclass fields and
    attributes their classes set on self."""
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "SegmentationDeepEditLib":
            if node.module == "SegmentationDeepEditLib":
                modules |= {f"SegmentationDeepEditLib.{a.name}" for a in node.names}
            else:
                modules.add(node.module)
    names = set()
    for name in modules:
        module = importlib.import_module(name)
        names |= set(dir(module))
        for obj in vars(module).values():
            if inspect.isclass(obj) and obj.__module__ == name:  # its own classes, not ones it imports
                names |= set(dir(obj))
                if dataclasses.is_dataclass(obj):
                    names |= {f.name for f in dataclasses.fields(obj)}
        for node in ast.walk(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


def _slicer_api_usage(tree):
    """The Slicer-side names the module uses.

    Returns:
        (dotted names rooted at slicer/qt/ctk/vtk/SampleData/PyTorchUtils, including names imported
        from them and ``name(keyword=)`` for keyword arguments of their functions;
        attribute names used on other objects; attribute names used on widgets; Qt signal signatures).
    """
    imports = _imports(tree)
    own = _bound_names(tree)
    star_names = {n for n in dir(builtins)}  # names neither imported, defined nor builtin: the star import
    dotted, attributes, widget_attributes, signals = set(), set(), set(), set()
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)}

    def resolve(chain):
        root = imports.get(chain[0])
        if root is None and chain[0] not in own and chain[0] not in star_names and chain[0][0].isupper():
            root = f"slicer.ScriptedLoadableModule.{chain[0]}"  # from slicer.ScriptedLoadableModule import *
        return (root.split(".") + chain[1:]) if root else chain

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            full = resolve([node.id])
            if full[0] in SLICER_ROOTS and len(full) > 1:
                dotted.add(".".join(full))
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("connect", "disconnect") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                signals.add(node.args[0].value)
            chain = _attribute_chain(f)
            full = resolve(chain) if chain else None
            if full and full[0] in SLICER_ROOTS:
                dotted.update(f"{'.'.join(full)}({k.arg}=)" for k in node.keywords if k.arg)
            if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                target = _attribute_chain(node.args[0])
                full = resolve(target) if target else None
                if full and full[0] in SLICER_ROOTS:
                    dotted.add(".".join(full + [node.args[1].value]))
                else:
                    attributes.add(node.args[1].value)
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain = _attribute_chain(node)
        if chain is None:  # attributes of a call's or subscript's result
            while isinstance(node, ast.Attribute):
                attributes.add(node.attr)
                node = node.value
            continue
        full = resolve(chain)
        if full[0] in SLICER_ROOTS:
            dotted.add(".".join(full))
        elif chain[0] in imports:
            continue  # numpy, os, SimpleITK, the core...: not Slicer
        elif chain[:2] == ["self", "ui"]:
            widget_attributes.update(chain[3:])  # chain[2] is a widget name: checked against the .ui file
        elif chain[:2] in (["self", "segmentEditorWidget"], ["self", "parent"], ["self", "layout"]) and len(chain) > 2:
            widget_attributes.update(chain[1 if chain[1] in ("parent", "layout") else 2:])  # Qt objects, even for names str has
        else:
            attributes.update(chain[1:])
    return dotted, attributes, widget_attributes, signals


def _api_list():
    """Entries of the verified-API list: name -> (owner, where verified)."""
    entries = {}
    for n, line in enumerate(API_LIST.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        assert len(parts) >= 3, f"{API_LIST.name}:{n}: expected 'name owner where-verified', got {line!r}"
        name, where = parts[0], parts[-1]
        assert re.match(r"^(v5\.\d+\.\d+|HEAD|[\w.-]+/[\w.-]+@[0-9a-f]{7,40}):[\w./+-]+:\d+$", where) \
            or where.startswith("https://"), \
            f"{API_LIST.name}:{n}: where-verified must be tag:path:line, owner/repo@commit:path:line or a URL: {where!r}"
        assert name not in entries, f"{API_LIST.name}:{n}: {name} listed twice"
        entries[name] = (" ".join(parts[1:-1]), where)
    return entries


def _needed_api_names():
    tree = ast.parse(_module_source())
    dotted, attributes, widget_attributes, signals = _slicer_api_usage(tree)
    explained = _own_names(tree) | _library_names() | _core_names(tree)
    needed = set(dotted)
    needed |= {f".{a}" for a in attributes - explained}
    needed |= {f".{a}" for a in widget_attributes}
    needed |= {f"signal:{s}" for s in signals}
    return needed


def test_every_slicer_api_name_is_verified():
    """A name the module uses from Slicer, Qt, CTK, VTK or MRML that is not in the list of names
    verified in Slicer's source (a misspelling, or a new name nobody checked) fails here."""
    listed = _api_list()
    needed = _needed_api_names()
    unverified = sorted(needed - set(listed))
    assert not unverified, (
        f"names used in {MODULE_FILE.name} but not in {API_LIST.relative_to(ROOT)} (misspelt, or not verified "
        f"in Slicer's source yet): {unverified}")


def test_api_list_has_no_stale_entries():
    """The list says exactly what the module uses, so that it stays worth reading."""
    stale = sorted(set(_api_list()) - _needed_api_names())
    assert not stale, f"{API_LIST.relative_to(ROOT)} lists names the module no longer uses: {stale}"


def test_api_check_catches_a_misspelling(monkeypatch):
    """The check itself works: a misspelt MRML method and a misspelt slicer.util function are caught."""
    source = _module_source()
    for wrong in ("GetSegmentaton()", "slicer.util.arrayFromVolum("):
        right = wrong.replace("Segmentaton", "Segmentation").replace("Volum(", "Volume(")
        assert right in source
        monkeypatch.setattr(sys.modules[__name__], "_module_source", lambda w=wrong, r=right: source.replace(r, w, 1))
        assert _needed_api_names() - set(_api_list()), f"{wrong} was not caught"
