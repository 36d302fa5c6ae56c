"""The locked environment (#36, section 4): requirements.lock pins every dependency pyproject.toml names
(the test extra too) with sha256 hashes, and the tests run in exactly that environment (the README's
commands and .ci/run install from it), so a number a test checks was made by the pinned versions."""
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, tuple[str, str | None, int]]:
    """{name: (version, marker or None, number of hashes)} from requirements.lock."""
    pins, current = {}, None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match:
            current = canonicalize_name(match[1])
            pins[current] = (match[2], match[3], 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            v, marker, n = pins[current]
            pins[current] = (v, marker, n + 1)
    return pins


def test_the_lock_pins_every_declared_dependency_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = locked()
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in requirements.lock: regenerate it (its header says how)"
        pinned, _, hashes = pins[name]
        assert req.specifier.contains(pinned, prereleases=True), (name, pinned, str(req.specifier))
        assert hashes >= 1, name
    assert all(n >= 1 for _, _, n in pins.values())  # pip's hash-checking mode needs every file's hash


def test_the_tests_run_in_the_locked_environment():
    """Every pinned package that applies to this machine is installed at its pinned version."""
    wrong = {}
    for name, (pinned, marker, _) in locked().items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned and not (name == "torch" and installed and installed.split("+")[0] == pinned):
            wrong[name] = (pinned, installed)
    assert not wrong, f"installed versions differ from requirements.lock (pinned, installed): {wrong}"
