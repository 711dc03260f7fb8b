"""Errors that tell the user what to do.

Every error turbotune raises on bad input derives from :class:`TurbotuneError`, so the CLI can
print it as one clean message (no traceback) and exit with status 2.
"""

from __future__ import annotations


class TurbotuneError(Exception):
    """Base class of the errors caused by the user's input or environment."""


class ConfigError(TurbotuneError, ValueError):
    """A configuration key is unknown, of the wrong type, or out of its choices."""


class MissingPackageError(TurbotuneError, ImportError):
    """An optional package that a plugin or feature needs is not installed."""

    def __init__(self, package: str, *, feature: str, pip: str | None = None):
        self.package = package
        self.pip = pip or f"pip install {package}"
        super().__init__(
            f"{feature} needs the package '{package}', which is not installed: run `{self.pip}`"
        )


class UnsupportedModelError(TurbotuneError):
    """A plugin was asked to work on a model family it does not support."""


class DataError(TurbotuneError, ValueError):
    """A dataset is missing, empty, or has rows that cannot be trained on."""
