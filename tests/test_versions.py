"""The versions the project declares agree with each other and with what is installed.

pyproject.toml gives ranges (the oldest versions known to work); constraints.txt pins the exact
set the suite passed with, and `make setup` installs through it. A pin outside its range, or an
installed torch / DeepSpeed / transformers below its floor, means a declaration is untrue: a user
trusting it gets a traceback deep in training instead of an install-time refusal.
"""

from __future__ import annotations

import re
import tomllib  # Python 3.11+, as pyproject requires
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CORE = ("torch", "deepspeed", "transformers")  # what the training code calls into version-sensitively
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def requirements(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Requirement]:
    """Every requirement pyproject names (core and every extra), by canonical name; the project's
    reference to its own extras (layer-aware[monitor]) left out."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"]) + [
        r for extra in project.get("optional-dependencies", {}).values() for r in extra
    ]
    reqs = {}
    for line in lines:
        r = Requirement(line)
        if canonicalize_name(r.name) != canonicalize_name(project["name"]):
            reqs[canonicalize_name(r.name)] = r
    return reqs


def pins(text: str) -> dict[str, str]:
    """name -> version of a constraints file's `name==version` lines; any other line that is not a
    comment or blank raises: the lock holds exact pins only."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = PIN.match(line.strip())
        if not m:
            raise ValueError(f"constraints line {n} is not an exact pin: {line!r}")
        out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def disagreements(versions: dict[str, str], reqs: dict[str, Requirement]) -> list[str]:
    """Each `name version` outside the range pyproject gives that name (local tags such as +cpu
    ignored, as pip does)."""
    return [
        f"{name} {v} is outside pyproject's {reqs[name]}"
        for name, v in sorted(versions.items())
        if name in reqs and not reqs[name].specifier.contains(Version(v).public, prereleases=True)
    ]


def test_the_checks_can_fail():
    reqs = {"transformers": Requirement("transformers>=5.24"), "torch": Requirement("torch>=2.13")}
    assert disagreements({"transformers": "5.23.0", "torch": "2.13.0+cpu", "numpy": "1.0"}, reqs) == [
        "transformers 5.23.0 is outside pyproject's transformers>=5.24"
    ]
    assert disagreements({"transformers": "5.25.0", "torch": "2.13.0+cu128"}, reqs) == []
    with pytest.raises(ValueError, match="line 2"):
        pins("# header\ntransformers>=5.24\n")


def test_every_pin_in_the_lock_is_inside_pyprojects_range():
    assert not disagreements(pins((REPO / "constraints.txt").read_text()), requirements())


def test_the_lock_pins_every_dependency_except_torch_and_not_the_project():
    locked, reqs = pins((REPO / "constraints.txt").read_text()), requirements()
    assert "layer-aware" not in locked and "torch" not in locked  # the checkout itself; TORCH installs torch
    assert not [name for name in reqs if name != "torch" and name not in locked], "run `make lock`"


def test_installed_core_libraries_meet_pyprojects_floors():
    reqs, installed = requirements(), {}
    for name in CORE:
        try:
            installed[name] = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is not installed")
    assert not disagreements(installed, reqs)
