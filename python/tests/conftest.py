"""Shared by the Python tests: with MST_REQUIRE_TORCH=1 (scripts/test sets it when it installed the pinned
stack), a missing torch or transformers is an error, not a reason to skip the torch tests; and `mst_plan`,
the binary under test."""

import os
from pathlib import Path

import pytest

if os.environ.get("MST_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401
    import transformers  # noqa: F401


@pytest.fixture
def mst_plan() -> Path:
    """The mst-plan binary under test: MST_PLAN (ctest sets it), else the checkout's build/src/mst-plan; a test
    that needs it skips where it is not built."""
    path = Path(os.environ.get("MST_PLAN", Path(__file__).resolve().parents[2] / "build" / "src" / "mst-plan"))
    if not path.is_file():
        pytest.skip("mst-plan is not built (set MST_PLAN or build/)")
    return path
