"""One namespace, imports pointing one way: calibration <- registration <- tracking (issue 17, STYLE.md section 1).

The code installs as ``spineguide.calibration``, ``spineguide.registration`` and ``spineguide.tracking``
(pyproject maps the three top-level folders); no file anywhere in the repository imports the bare generic
names, which other distributions also install (django-registration, django-tracking2).
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calibration", "registration", "tracking")
FORBIDDEN = {
    "calibration": {"registration", "tracking"},
    "registration": {"tracking"},
    "tracking": set(),
}


def _imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (level-0 ``import``/``from`` statements, at any depth)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _spineguide_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "spineguide" else None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down_only(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = {m for m in _imported_modules(path) if _spineguide_package(m) in FORBIDDEN[package]}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def _repository_python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).exists()]
    return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts]


def test_no_file_imports_a_bare_package_name():
    offenders = []
    for path in _repository_python_files():
        bare = {m for m in _imported_modules(path) if m.split(".")[0] in PACKAGES}
        if bare:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bare)}")
    assert not offenders, "bare imports (use spineguide.<package>):\n" + "\n".join(offenders)


def test_the_installed_packages_are_the_repository_folders():
    for name in PACKAGES:
        spec = importlib.util.find_spec(f"spineguide.{name}")
        assert spec is not None and spec.origin is not None, name
        assert Path(spec.origin).resolve().parent == (ROOT / name).resolve(), (name, spec.origin)


def test_no_bare_package_is_installed():
    # outside the repository (cwd /), where the folders themselves are not on sys.path: a bare name
    # that resolves at all must not resolve to this repository's code
    code = ("import importlib.util; "
            "print('\\n'.join(str(getattr(importlib.util.find_spec(n), 'origin', None)) "
            "for n in ('calibration', 'registration', 'tracking', 'datasets')))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    origins = out.stdout.split()
    assert len(origins) == 4, out
    inside = [o for o in origins if o != "None" and str(ROOT.resolve()) in str(Path(o).resolve())]
    assert not inside, inside


def test_no_top_level_datasets_package_is_installed():
    assert not (ROOT / "datasets" / "__init__.py").exists()


def test_the_cli_and_the_package_roots_import_lazily():
    """`spineguide --help` must not load the numeric stack (issue 17: <= 0.3 s; timed in benchmarks/bench_startup.py).

    Importing the CLI, parsing `--help` and importing the three package roots must not import numba, SciPy, OpenCV,
    SimpleITK or pydicom; a name from a package root still resolves (PEP 562) to its submodule's object.
    """
    code = (
        "import sys\n"
        "import spineguide.calibration, spineguide.registration, spineguide.tracking\n"
        "from spineguide.tracking.cli.main import build_parser\n"
        "try:\n"
        "    build_parser().parse_args(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('numba', 'scipy', 'cv2', 'SimpleITK', 'pydicom') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    heavy = [line for line in out.stdout.splitlines() if line.startswith("HEAVY=")]
    assert heavy == ["HEAVY="], f"imported at --help: {heavy}"
    from spineguide.calibration import StereoGeometry
    from spineguide.calibration.geometry import StereoGeometry as direct
    from spineguide.tracking import localise_fiducials
    from spineguide.tracking.localisation.fiducials import localise_fiducials as direct_fn

    assert StereoGeometry is direct and localise_fiducials is direct_fn
    import spineguide.registration as reg

    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        reg.nothing_here  # noqa: B018
    assert set(reg.__all__) <= set(dir(reg))


# ----------------------------------------------------------------------------------------------------------------
# The module import graph: every import (module level or inside a function, absolute or relative) as an edge.

def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([f"spineguide.{package}", *parts])


def _package_modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` file of the folder ``root`` installed as ``spineguide.<package>``."""
    return {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports anywhere in its text (function-level imports included).

    ``from X import name`` counts as an import of ``X.name`` where that is a module, else of ``X``; an import of a
    module that is not in ``modules`` counts as an import of its nearest enclosing module that is.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                submodules = {f"{module}.{alias.name}" for alias in node.names} & set(modules)
                targets.update(submodules)
                if len(submodules) < len(node.names):  # some name is an attribute of the module itself
                    targets.add(module)
        edges = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_checker_finds_a_circle_and_only_a_circle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    # a synthetic package with the two ways an import circle hides: inside a function, and relative
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "volume.py").write_text("def read():\n    from .sub.dicom import read_series\n    return read_series()\n")
    (pkg / "sub" / "dicom.py").write_text("from ..volume import read\nfrom .. import other\n")
    (pkg / "other.py").write_text("X = 1\n")
    graph = import_graph(_package_modules(pkg, "pkg"))
    assert graph["spineguide.pkg.sub.dicom"] == {"spineguide.pkg.volume", "spineguide.pkg.other"}
    assert import_cycles(graph) == [["spineguide.pkg.sub.dicom", "spineguide.pkg.volume"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    cycles = import_cycles(import_graph(_package_modules(ROOT / package, package)))
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------------------------------------------
# The rooms inside tracking (docs/ARCHITECTURE.md). A room may import the rooms listed for it, itself, and the
# lower packages; the console reaches the service only through its protocol and file formats.

ROOM_OF = {
    "errors": "core", "frames": "core",
    "localisation": "localisation", "service": "service", "room": "room", "sim": "sim", "console": "console",
    "cli": "cli",
}
ROOM_MAY_IMPORT = {
    "core": {"core"},
    "localisation": {"core"},
    "room": {"core"},
    "service": {"core", "localisation"},
    "sim": {"core", "localisation", "room", "service"},
    "console": {"core", "service-protocol"},
    "cli": {"core", "localisation", "room", "service", "sim", "console"},
}
#: The service modules a client (the console) may use: the wire protocol, CURVE keys, the session record's format,
#: the configuration file and the plan it names. Not the loop, the engine, pairing, processing or exports.
SERVICE_PROTOCOL = {"wire", "security", "record", "config", "config_file", "plan"}


def _room(module: str) -> str | None:
    """The room of a module of spineguide.tracking (``service-protocol`` for the service's protocol modules)."""
    parts = module.split(".")
    if parts[:2] != ["spineguide", "tracking"]:
        return None
    if len(parts) == 2:
        return "core"
    room = ROOM_OF.get(parts[2])
    assert room is not None, f"{module}: a tracking module in no room; add it to ROOM_OF"
    if room == "service" and len(parts) > 3 and parts[3] in SERVICE_PROTOCOL:
        return "service-protocol"
    return room


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    offenders = []
    for module, targets in sorted(graph.items()):
        room = _room(module)
        if room is None:
            continue
        room = "service" if room == "service-protocol" else room
        allowed = ROOM_MAY_IMPORT[room] | {room}
        if "service" in allowed:
            allowed = allowed | {"service-protocol"}
        bad = sorted(t for t in targets if _room(t) not in (None, *allowed))
        if bad:
            offenders.append(f"{module} ({room}) imports {bad}")
    return offenders


def test_each_room_of_tracking_imports_only_the_rooms_below_it():
    graph = import_graph(_package_modules(ROOT / "tracking", "tracking"))
    assert not room_violations(graph), "\n".join(room_violations(graph))


def test_the_room_rules_catch_a_service_that_imports_the_cli_and_a_console_that_imports_the_engine():
    graph = {
        "spineguide.tracking.service.exports": {"spineguide.tracking.cli.dicom", "spineguide.tracking.errors"},
        "spineguide.tracking.console.config": {"spineguide.tracking.service.states",
                                               "spineguide.tracking.service.wire"},
        "spineguide.tracking.localisation.fiducials": {"spineguide.tracking.service.gating"},
        "spineguide.tracking.room.kv": {"spineguide.tracking.sim.simulators"},
        "spineguide.tracking.sim.rig": {"spineguide.tracking.console.server"},
        "spineguide.tracking.cli.main": {"spineguide.tracking.console.server", "spineguide.tracking.service.loop"},
    }
    found = room_violations(graph)
    assert found == [
        "spineguide.tracking.console.config (console) imports ['spineguide.tracking.service.states']",
        "spineguide.tracking.localisation.fiducials (localisation) imports ['spineguide.tracking.service.gating']",
        "spineguide.tracking.room.kv (room) imports ['spineguide.tracking.sim.simulators']",
        "spineguide.tracking.service.exports (service) imports ['spineguide.tracking.cli.dicom']",
        "spineguide.tracking.sim.rig (sim) imports ['spineguide.tracking.console.server']",
    ]


# ----------------------------------------------------------------------------------------------------------------
# One error hierarchy per package (STYLE.md section 5): every public exception class is defined in its package's
# errors.py and derives from the package's root; no exception name is defined twice across the three packages.

ROOT_ERROR = {"calibration": "CalibrationError", "registration": "RegistrationError", "tracking": "TrackingError"}


def exception_classes(files: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(class name, file label, package) of every class defined in ``files`` that derives from an exception.

    ``files`` maps a label (``package/path``) to a file. A class counts when a base's name ends in ``Error``,
    ``Exception`` or ``Refused``, or names a class found so in the same files (followed to a fixed point).
    """
    classes = []
    for label, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                         for b in node.bases}
                classes.append((node.name, label, label.split("/")[0], bases))
    errors = {n for n, *_ in classes if n.endswith(("Error", "Exception"))}
    changed = True
    while changed:
        found = {n for n, _, _, bases in classes
                 if any(b in errors or b.endswith(("Error", "Exception", "Refused")) for b in bases)}
        changed = not found <= errors
        errors |= found
    return [(n, label, pkg) for n, label, pkg, bases in classes
            if n in errors and any(b in errors or b.endswith(("Error", "Exception", "Refused")) for b in bases)]


def error_hierarchy_problems(found: list[tuple[str, str, str]]) -> list[str]:
    problems = []
    where: dict[str, list[str]] = {}
    for name, label, package in found:
        where.setdefault(name, []).append(label)
        if not name.startswith("_") and label != f"{package}/errors.py":
            problems.append(f"{name} is defined in {label}, not in {package}/errors.py")
    problems += [f"{name} is defined {len(labels)} times: {sorted(labels)}" for name, labels in sorted(where.items())
                 if len(labels) > 1]
    return problems


def test_one_error_hierarchy_per_package_and_no_name_twice():
    files = {f"{p.relative_to(ROOT)}": p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
    found = exception_classes(files)
    assert {n for n, label, _ in found if label.endswith("errors.py")} >= set(ROOT_ERROR.values())
    problems = error_hierarchy_problems(found)
    assert not problems, "\n".join(problems)
    # every public error derives from its package's root
    import importlib

    for name, label, package in found:
        if name.startswith("_"):
            continue
        module = importlib.import_module(f"spineguide.{package}.errors")
        assert issubclass(getattr(module, name), getattr(module, ROOT_ERROR[package])), (package, name)


def test_the_error_checker_finds_a_name_twice_and_an_error_outside_errors_py():
    found = [("FrameError", "registration/errors.py", "registration"),
             ("FrameError", "tracking/errors.py", "tracking"),
             ("PhantomError", "tracking/room/phantoms.py", "tracking"),
             ("_Refused", "calibration/jsonfile.py", "calibration")]
    assert error_hierarchy_problems(found) == [
        "PhantomError is defined in tracking/room/phantoms.py, not in tracking/errors.py",
        "FrameError is defined 2 times: ['registration/errors.py', 'tracking/errors.py']",
    ]


def test_every_package_folder_is_in_the_pyproject_packages_list():
    """A room added as a folder must also be listed, or a wheel installs without it (the editable install hides it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(["spineguide", *init.parent.relative_to(ROOT).parts])
               for package in PACKAGES for init in (ROOT / package).rglob("__init__.py")}
    assert folders == listed, f"missing from pyproject: {sorted(folders - listed)}; extra: {sorted(listed - folders)}"
