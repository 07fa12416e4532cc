"""Shared test settings: quiet TensorFlow, and the reference's fixture folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Records written by the reference implementation; present in CI and next to the
# developers' clones, absent in a user's clone.
OFFICIAL_TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "official"


@pytest.fixture
def official_testdata() -> Path:
    if not OFFICIAL_TESTDATA.is_dir():
        pytest.skip(f"reference fixtures not found at {OFFICIAL_TESTDATA} (only in CI and dev)")
    return OFFICIAL_TESTDATA
