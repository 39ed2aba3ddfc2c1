"""Checking the option dicts that backends and formats accept: one message for every unknown key."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["check_options"]


def check_options(owner: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raises ValueError naming the unknown keys of `options` and the ones `owner` accepts.

    Example:
        >>> check_options("the inductor backend", {"modee": 1}, ["mode"])
        Traceback (most recent call last):
        ValueError: the inductor backend: options ['modee'] are unknown; it accepts ['mode']
    """
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepts = f"it accepts {allowed}" if allowed else "it takes no options"
        raise ValueError(f"{owner}: options {unknown} are unknown; {accepts}")
