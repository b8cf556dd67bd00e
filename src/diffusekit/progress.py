"""Progress bars: every bar diffusekit draws comes from `bar`, so one switch turns them all off.

`diffusekit -q` turns them off for one command; a library user does the same around any call,
`with dk.progress_bars(False): pipe.sample(...)`, or passes progress=False where a function takes it.
"""
from __future__ import annotations

import contextlib

_enabled = [True]          # the switch (a list, so that the context manager can set it without `global`)


def bars_enabled() -> bool:
    """Whether bars are drawn at all (progress=True arguments still choose which)."""
    return _enabled[0]


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Draw (True) or hide (False) every diffusekit progress bar inside the block; restored after it."""
    before, _enabled[0] = _enabled[0], bool(enabled)
    try:
        yield
    finally:
        _enabled[0] = before


def bar(iterable=None, *, show: bool = True, **kwargs):
    """A tqdm bar (its keyword arguments), drawn when `show` and the switch both allow it."""
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=not (show and _enabled[0]), **kwargs)
