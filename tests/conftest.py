from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# the hash cache of the tests (and of the CLI processes they start) is their own, never the user's
os.environ["LORAMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="loramerge-test-cache-")

REAL_LORAS = Path(os.environ.get("LORAMERGE_REAL_LORAS")
                  or Path(__file__).resolve().parents[2] / "shared" / "data" / "real-loras")

requires_real_loras = pytest.mark.skipif(
    not REAL_LORAS.is_dir(),
    reason=f"real LoRA files not found at {REAL_LORAS} (the shared data tier; set LORAMERGE_REAL_LORAS)")


@pytest.fixture(scope="session")
def real_loras() -> Path:
    if not REAL_LORAS.is_dir():
        pytest.skip(f"real LoRA files not found at {REAL_LORAS}")
    return REAL_LORAS


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["LORAMERGE_CACHE_DIR"], ignore_errors=True)
