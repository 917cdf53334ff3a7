"""WebUI glue: make lib_loramerge importable for the whole session.

A1111 puts an extension's root on sys.path only while its scripts load; handlers run later
and may import submodules lazily, so the root is added for good (at the end, so it never
shadows the WebUI's own modules).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

import lib_loramerge  # noqa: E402,F401  (after the path fix, by design)
