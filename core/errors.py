"""One exception hierarchy for every part of ngcal.

Foreign exceptions are wrapped at the boundary with ``raise ... from``; each message
names the offending file, field or value.
"""

from __future__ import annotations


class NgcalError(Exception):
    """Root of every error ngcal raises on purpose."""


class ConfigError(NgcalError):
    """A configuration file or command-line option is invalid."""


class DataError(NgcalError):
    """A data folder does not have the expected layout or content."""


class ImageError(NgcalError):
    """An image cannot be read or decoded; ``path`` names it, ``reason`` is a short code."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        msg = f"{path}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ArtifactError(NgcalError):
    """An artifact (model dir, bundle, score set, thresholds) is missing, corrupt or tampered."""


class BackendError(NgcalError):
    """A scoring runtime (onnxruntime provider, TensorRT, GPU) is unavailable or failed."""
