"""The one exception type users see: a single line naming the file (and module) at fault."""

from __future__ import annotations

import os


def display_path(path: str | os.PathLike | None) -> str:
    """A path as text that can always be printed: bytes of the name that are not UTF-8 shown as ``\\xNN``."""
    if path is None:
        return ""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class LoraMergeError(Exception):
    """A problem with the user's input or request, phrased for the user.

    ``str(err)`` is one line: ``<file>: <module>: <reason>`` with the parts that are known.
    The CLI prints it as ``error: <str(err)>`` and exits with status 2; the UI shows it as a message.
    """

    def __init__(self, reason: str, path: str | os.PathLike | None = None, module: str | None = None):
        self.reason = " ".join(str(reason).split())  # always one line
        self.path = display_path(path) if path is not None else None
        self.module = module
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [p for p in (self.path, self.module) if p]
        return ": ".join([*parts, self.reason])

    def with_path(self, path: str | os.PathLike) -> LoraMergeError:
        """The same error, attributed to ``path`` when it names no file yet."""
        if self.path is None:
            return LoraMergeError(self.reason, path, self.module)
        return self
