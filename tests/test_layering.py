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
        "from spineguide.tracking.cli import build_parser\n"
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
    from spineguide.tracking.fiducials import localise_fiducials as direct_fn

    assert StereoGeometry is direct and localise_fiducials is direct_fn
    import spineguide.registration as reg

    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        reg.nothing_here  # noqa: B018
    assert set(reg.__all__) <= set(dir(reg))
