"""pyproject.toml, environment.yml, constraints-cpu.txt and requirements-lock.txt describe the same installation."""
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string such as 'Torch>=2.2'."""
    match = NAME.match(requirement)
    assert match, f"not a requirement: {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _environment_pip_requirements() -> list[str]:
    """Items of the `- pip:` list in environment.yml (a tiny parser: no PyYAML needed)."""
    items, pip_indent = [], None
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if line.strip() == "- pip:":
            pip_indent = indent
        elif pip_indent is not None and indent > pip_indent and line.strip().startswith("- "):
            items.append(line.strip()[2:].strip())
        elif pip_indent is not None and indent <= pip_indent:
            pip_indent = None
    return items


def test_environment_lists_the_runtime_and_dev_dependencies():
    project = _pyproject()
    expected = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    listed = [r for r in _environment_pip_requirements() if not r.startswith("-")]
    assert listed, "environment.yml has no pip section"
    assert {_name(r) for r in listed} == expected
    assert "-e .[dev]" in _environment_pip_requirements()


def test_dependencies_have_lower_bounds_only():
    project = _pyproject()
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        assert ">=" in requirement and not re.search(r"==|<|~=|!=", requirement), (
            f"{requirement!r}: use a lower bound only (exact pins break on newer Pythons)"
        )


def test_cpu_constraints_pin_torch():
    lines = [l.split("#")[0].strip() for l in (ROOT / "constraints-cpu.txt").read_text().splitlines()]
    pins = [l for l in lines if l and _name(l) == "torch"]
    assert len(pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", pins[0]), pins


def _lock() -> dict[str, str]:
    """requirements-lock.txt as {normalised name: exact version}."""
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements-lock.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version.strip()
    return pins


def test_lock_pins_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement

    project, lock = _pyproject(), _lock()
    extras = project["optional-dependencies"]
    for requirement in map(Requirement, project["dependencies"] + extras["dev"] + extras["hf"] + extras["browser"]):
        name = _name(requirement.name)
        if name == "torch":  # constraints-cpu.txt on a CPU, your own torch on a GPU
            assert name not in lock
            continue
        assert name in lock, f"{name} is missing from requirements-lock.txt: run `make lock`"
        assert lock[name] in requirement.specifier, f"locked {name}=={lock[name]} is outside {requirement}"


def test_tested_versions_named_at_run_time_are_the_locked_ones():
    pytest.importorskip("transformers", reason='the "hf" extra is not installed')
    from titans_mini import hf

    lock = _lock()
    assert {name: lock[name] for name in hf.TESTED_VERSIONS} == hf.TESTED_VERSIONS
