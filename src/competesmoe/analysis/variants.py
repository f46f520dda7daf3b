"""Named router variants for `competesmoe compare`.

Syntax of one entry: `ROUTER` or `ROUTER:KEY=VALUE[+KEY=VALUE...]`, entries separated by commas:

    smoe,xmoe,competesmoe,competesmoe:kappa=silu,competesmoe:alpha=0+omega=0.03

KEY is any config key `apply_overrides` accepts (dotted path or unique leaf name). Every `+` separates
overrides except inside a number such as `1e+3`; values may not contain `+` otherwise, nor commas.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ROUTERS, ConfigError

_KEY = r"[A-Za-z_][A-Za-z0-9_.]*"
_SPLIT_PLUS = re.compile(r"(?<![0-9][eE])\+|(?<=[0-9][eE])\+(?![0-9])")  # not the + of 1e+3


@dataclass(frozen=True)
class Variant:
    label: str                       # the entry as written (normalised), e.g. "competesmoe:kappa=silu"
    router: str
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """A portable folder name: `competesmoe__kappa-silu__alpha-0`."""
        parts = [self.router] + [o.replace("=", "-") for o in self.overrides]
        return re.sub(r"[^A-Za-z0-9._-]", "-", "__".join(parts))


def parse_variant(entry: str) -> Variant:
    entry = entry.strip()
    if not entry:
        raise ConfigError("empty router entry (check for doubled or trailing commas)")
    router, sep, rest = entry.partition(":")
    router = router.strip()
    if router not in ROUTERS:
        raise ConfigError(f"unknown router {router!r} in {entry!r}; choose from {', '.join(ROUTERS)}")
    if not sep:
        return Variant(router, router)
    if not rest.strip():
        raise ConfigError(f"{entry!r}: nothing after ':' (expected {router}:KEY=VALUE[+KEY=VALUE...])")
    overrides = []
    for item in _SPLIT_PLUS.split(rest):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not re.fullmatch(_KEY, key) or not value:
            raise ConfigError(f"{entry!r}: bad override {item!r} (expected KEY=VALUE, several joined by '+')")
        if key.split(".")[-1] == "router":
            raise ConfigError(f"{entry!r}: the router is named before ':', not overridden")
        overrides.append(f"{key}={value}")
    return Variant(f"{router}:" + "+".join(overrides), router, tuple(overrides))


def parse_variants(spec: str) -> list[Variant]:
    """Comma-separated entries; duplicates (same label or same folder) are an error."""
    variants = [parse_variant(e) for e in spec.split(",")]
    labels: dict[str, str] = {}
    slugs: dict[str, str] = {}
    for v in variants:
        for seen, key in ((labels, v.label), (slugs, v.slug)):
            if key in seen:
                raise ConfigError(f"router entry {v.label!r} given twice (or clashes with {seen[key]!r})")
            seen[key] = v.label
    return variants
