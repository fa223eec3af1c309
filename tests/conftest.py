import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_example"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data/totalseg_example (a real CT, an LPS MR and a reference liver mask)."""
    if not (SHARED_DATA / "liver_ref_3mm.nii.gz").is_file():
        pytest.skip(f"shared example data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def liverkd_cmd() -> list[str]:
    """The installed `liverkd` console script beside this interpreter (else `python -m liverkd`)."""
    script = Path(sys.executable).parent / "liverkd"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "liverkd"]
