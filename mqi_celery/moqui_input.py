"""Read and write MOQUI input files (``moqui_tps.in``).

The format is one ``Key value`` pair per line. ``#`` starts a comment anywhere
on a line (MOQUI writes ``TotalThreads -1 #(Integer, ...)``), and blank or
comment-only lines are ignored. The value is everything after the first run of
whitespace, so values may contain spaces.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["parse", "render"]


def parse(text: str) -> dict[str, str]:
    """Parse MOQUI input text into an ordered ``{key: value}`` dict.

    Values stay strings; callers convert what they need. A key given twice
    keeps its last value. Raises ``ValueError`` naming the 1-based line number
    for a line that has a key but no value.
    """
    values: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise ValueError(f"line {number}: key {parts[0]!r} has no value")
        values[parts[0]] = parts[1].strip()
    return values


def _format_value(value: object) -> str:
    # MOQUI's parser expects lowercase booleans; str(True) would give "True".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(values: Mapping[str, object]) -> str:
    """Render ``values`` as MOQUI input text, one ``Key value`` line each, in order.

    Booleans become ``true``/``false``; everything else goes through ``str()``.
    Raises ``ValueError`` naming the key for anything ``parse`` could not read
    back unchanged: a key that is empty or holds whitespace, a value that is
    empty or padded with whitespace, or a newline or ``#`` in either.
    """
    lines = []
    for key, value in values.items():
        text = _format_value(value)
        if not key or any(ch.isspace() for ch in key) or "#" in key:
            raise ValueError(f"invalid MOQUI input key {key!r}")
        # splitlines() also breaks on \v, \f, \x1c-\x1e, \x85, \u2028, ...
        if len(text.splitlines()) > 1 or text.endswith(("\n", "\r")) or "#" in text:
            raise ValueError(f"value for key {key!r} contains a newline or '#'")
        if not text or text != text.strip():
            # parse() strips values, so these would not survive a round trip.
            raise ValueError(f"value for key {key!r} is empty or padded with whitespace")
        lines.append(f"{key} {text}\n")
    return "".join(lines)
