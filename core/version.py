"""The installed ngcal version, read from package metadata."""

from __future__ import annotations

from importlib import metadata


def ngcal_version() -> str:
    """Version string of the installed distribution, ``0+unknown`` when not installed."""
    try:
        return metadata.version("ngcal")
    except metadata.PackageNotFoundError:
        return "0+unknown"
