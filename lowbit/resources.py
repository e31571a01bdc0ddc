"""Where the YAML files shipped with lowbit live (recipes/, configs/)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """`lowbit/_data/<name>` in an installed wheel, else `<repo>/<name>` next to the package."""
    installed = _PACKAGE_DIR / "_data" / name
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / name
