"""Security floors (issue 12.7): the installed dependencies and pyproject.toml both honour SECURITY-FLOORS.toml."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {
    canonicalize_name(name): Version(entry["version"])
    for name, entry in tomllib.loads((ROOT / "SECURITY-FLOORS.toml").read_text())["floors"].items()
}


def test_the_floor_table_names_the_advisory_packages() -> None:
    assert set(FLOORS) >= {"streamlit", "pillow", "pillow-heif", "torch"}


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_installed_version_is_at_least_its_security_floor(package: str) -> None:
    try:
        installed = Version(version(package))
    except PackageNotFoundError:
        pytest.fail(f"{package} is not installed (security floor {FLOORS[package]})")
    assert installed >= FLOORS[package], (
        f"{package} {installed} is installed, below its security floor {FLOORS[package]} (SECURITY-FLOORS.toml): "
        f"pip install -U '{package}>={FLOORS[package]}'"
    )


def _lowest_allowed(req: Requirement) -> Version | None:
    """The floor a requirement sets: its highest `>=`/`==`/`~=` bound (None: it allows any old version)."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", "===")]
    bounds += [Version(s.version) for s in req.specifier if s.operator == ">"]  # a strict bound still excludes below
    return max(bounds, default=None)


def test_pyproject_floors_are_at_least_the_table() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    for package, floor in FLOORS.items():
        assert package in declared, f"{package} has a security floor {floor} but is not in pyproject.toml dependencies"
        lowest = _lowest_allowed(declared[package])
        assert lowest is not None and lowest >= floor, (
            f"pyproject.toml allows {declared[package]}, below the security floor {package}>={floor}"
        )
