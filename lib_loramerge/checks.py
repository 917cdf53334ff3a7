"""Checks on what users type: strengths, output file names, and paths shown back to them.

The lowest layer (beside ``errors``): the reader, the writer, the jobs and the front-ends all use
these, so a bad strength or file name is refused the same way whichever door it came through.
"""

from __future__ import annotations

import math
import re

from .errors import LoraMergeError, display_path

# names Windows reserves for devices, with any extension ("NUL.safetensors" is the null device there)
_WINDOWS_RESERVED = re.compile(r"(?i)(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\..*)?")
# characters that make a name display differently from what it is (bidi overrides, invisible marks)
_DECEPTIVE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def as_strength(value: object, what: str = "strength") -> float:
    """A user-given strength or block weight as a finite float, or a one-line error.

    NaN or ±Inf would make every weight NaN; a text that is no number is a typing error. Both are
    refused here, before any work.
    """
    if isinstance(value, bool):
        raise LoraMergeError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        shown = " ".join(str(value).split())[:40]
        raise LoraMergeError(f"{what} must be a number, got '{shown}'") from None
    if not math.isfinite(number):
        raise LoraMergeError(f"{what} must be a finite number, got {number}")
    return number


def check_output_name(name: str) -> None:
    """Refuse a file name that is unsafe to create or to show: Windows device names, deceptive characters."""
    if _WINDOWS_RESERVED.fullmatch(name):
        raise LoraMergeError(f"output name '{name}' is a device name on Windows (CON, NUL, COM1, …); choose another")
    if _DECEPTIVE.search(name):
        raise LoraMergeError("output name holds invisible or text-direction control characters "
                             f"('{name.encode('unicode_escape').decode('ascii')}'); choose a plain name")
    if name != name.rstrip(" ."):
        raise LoraMergeError(f"output name '{name}' ends with a space or dot, which Windows cannot store")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise LoraMergeError(f"output name '{display_path(name)}' is not valid UTF-8; choose a plain name") from None
