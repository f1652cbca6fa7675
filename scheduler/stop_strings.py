"""Stop-string search that only looks where a new match can end: in the text just appended."""

from __future__ import annotations


def find_stop_string(text: str, num_new_chars: int, stop: list[str]) -> tuple[str, int] | None:
    """Finds a stop string ending inside the last `num_new_chars` chars of `text`.

    Matches ending earlier were already checked when their text arrived, so each search starts only
    `len(s) - 1` chars before the new text: a stop string split across several tokens is still found when its
    last piece arrives. Returns (stop string, start index) of the earliest-starting match (ties: list order).
    """
    if num_new_chars <= 0 or not stop:
        return None
    new_start = len(text) - min(num_new_chars, len(text))
    best: tuple[str, int] | None = None
    for s in stop:
        if not s:
            continue  # an empty stop string would match everywhere; treat it as absent
        start = text.find(s, max(0, new_start - len(s) + 1))
        if start >= 0 and (best is None or start < best[1]):
            best = (s, start)
    return best


def stop_holdback(stop: list[str]) -> int:
    """Chars a streamer must hold back: the longest proper prefix of a stop string that text may end with."""
    return max([len(s) - 1 for s in stop if s], default=0)
