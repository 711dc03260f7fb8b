"""Model surgery by table: the patch engine and the per-family patch rows."""

from turbotune.patches.engine import KINDS, PatchSet, apply_patches, family_of
from turbotune.patches.families import FAMILIES, Family

__all__ = ["FAMILIES", "KINDS", "Family", "PatchSet", "apply_patches", "family_of"]
