"""The install path: bounded dependency ranges, and a lock (constraints.txt) that install.sh uses and that
satisfies those ranges, so a fresh install gets the tested set. Whether this environment *is* the locked
set is checked by install.sh (`.ci/check_lock.py`), not here: the suite passes on any version in range."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in reqs]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_every_dependency_has_an_upper_bound():
    for req in requirements():
        assert any(s.operator == "<" for s in req.specifier), f"{req} has no upper bound on its major version"


def test_lock_pins_every_dependency_inside_its_range():
    locked = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        if name == "torch":  # install.sh installs torch itself (CPU wheel, or the user's CUDA build)
            assert name not in locked
            continue
        assert name in locked, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req.name}=={locked[name]} outside {req}"


def test_install_script_and_ci_use_the_lock():
    install = (ROOT / "install.sh").read_text()
    assert re.search(r"-c constraints\.txt", install)
    assert "bash install.sh test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text().split("\n```bash\n", 1)[1].split("```", 1)[0]
    assert "bash install.sh test" in readme and "pytest" in readme


def test_lock_check_of_install_sh_reports_each_drifted_package():
    """The lock check runs in install.sh (and so in CI), not in the suite, which must pass on every version the
    ranges allow; here it is checked on a made-up environment."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / ".ci" / "check_lock.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    locked = {canonicalize_name(k): str(v) for k, v in pins().items()}
    assert check.pins() == locked
    assert check.declared() == sorted({canonicalize_name(r.name) for r in requirements()})

    def env(drift):
        def installed(name):
            if name == "scipy":
                raise PackageNotFoundError(name)          # an extra that is not installed: skipped
            return drift.get(name, locked.get(name, "0"))
        return installed
    assert check.differences(installed=env({})) == []
    assert check.differences(installed=env({"numpy": "1.26.0", "pyyaml": "6.0.1"})) == [
        f"numpy: installed 1.26.0, locked {locked['numpy']}", f"pyyaml: installed 6.0.1, locked {locked['pyyaml']}"]
    assert ".ci/check_lock.py" in (ROOT / "install.sh").read_text()
