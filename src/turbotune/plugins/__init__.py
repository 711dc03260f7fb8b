"""Plugins: the protocol, the registry, and the built-in plugins."""

from .base import NoOptions, Plugin, Requirement
from .registry import BUILTIN, ENTRY_POINT_GROUP, activate, discover

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "NoOptions",
    "Plugin",
    "Requirement",
    "activate",
    "discover",
]
