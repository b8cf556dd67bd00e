"""Seeds derived from the run seed: every random draw names its purpose, step and rank.

`derive_seed(seed, "step", 120, rank)` gives the seed of one draw. A run that seeds each draw this
way, and never carries a generator across steps, resumes exactly from weights and optimizer state
alone (diffusekit.training). The bottom floor: networks, data and training all import it.
"""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and a tuple of keys, e.g. ("step", 120, rank)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
