"""Text from a case, the inbox or a host, shown on a terminal: always data. Never parsed as
rich markup (a ``[/]`` in a beam name would stop the command) and never passed on as a
control sequence (an escape in a folder name would drive the terminal)."""
from __future__ import annotations

import re

from rich.markup import escape
from rich.text import Text

# C0 and C1 controls (ESC, CR, BEL, ...) and the Unicode line and bidirectional-override marks.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def literal(value, *, lines: bool = False) -> str:
    """``value`` as printable text: control characters as ``\\x1b``-style escapes (with
    ``lines``, newlines and tabs are kept, for messages of several lines)."""
    pattern = _CONTROL_BUT_LINES if lines else _CONTROL
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), "" if value is None else str(value))


def data(value, *, style: str = "", lines: bool = False) -> Text:
    """A table cell or printed piece that is shown as it is: literal, never markup."""
    return Text(literal(value, lines=lines), style=style)


def in_markup(value) -> str:
    """``value`` for an f-string that also holds markup of ours."""
    return escape(literal(value))
