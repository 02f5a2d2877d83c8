"""Words for people: counts with the right plural."""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 target``, ``2 targets`` (``many`` for irregular plurals: ``1 entry``, ``2 entries``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"
