"""Is this environment the locked set? Every dependency declared in pyproject.toml (extras included) that
is installed must have the version pinned in constraints.txt (torch excepted: install.sh leaves its build
to the user). Run by install.sh after a pinned install (so CI checks it); not part of the test suite,
which must pass on every version the ranges allow.

    python .ci/check_lock.py        # exit 1 and one line per difference
"""
from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import tomllib
except ImportError:   # Python 3.10: pip's own copy
    from pip._vendor import tomli as tomllib
try:
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(root: Path = ROOT) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return sorted({canonical(re.match(r"\s*([A-Za-z0-9_.-]+)", r).group(1)) for r in reqs})


def pins(root: Path = ROOT) -> dict[str, str]:
    out = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, v = line.partition("==")
            out[canonical(name)] = v.strip()
    return out


def differences(root: Path = ROOT, installed=version) -> list[str]:
    """One line per declared, installed dependency whose version is not the locked one."""
    locked, out = pins(root), []
    for name in declared(root):
        if name == "torch":
            continue
        try:
            have = installed(name)
        except PackageNotFoundError:   # an extra that is not installed here
            continue
        if name not in locked:
            out.append(f"{name}: installed {have}, not pinned in constraints.txt")
        elif Version(have) != Version(locked[name]):
            out.append(f"{name}: installed {have}, locked {locked[name]}")
    return out


if __name__ == "__main__":
    diffs = differences()
    for d in diffs:
        print(f"lock check: {d}", file=sys.stderr)
    if diffs:
        print("lock check: this environment is not the locked set of constraints.txt (see docs/install.md)",
              file=sys.stderr)
    sys.exit(1 if diffs else 0)
