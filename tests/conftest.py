import importlib.util
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


# ---------------------------------------------------------------- runs without torch
# The runtime side needs no torch, and JetPack's Python (3.10) gets no CPU torch wheel here, so
# CI runs the suite a second time without it (.ci/run). Tests that train or export need torch:
# their modules are not collected, and a test that reaches torch through a fixture (a bundle
# exported from a checkpoint) is reported as skipped, with the reason. With torch installed,
# nothing changes.

HAVE_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "needs torch (pip install 'liverkd[train]'), not installed under this Python"
NEEDS_TORCH = {"test_ddp.py", "test_gtan.py", "test_losses.py", "test_models.py", "test_pipeline.py", "test_train.py"}
_not_collected: list[str] = []


def pytest_ignore_collect(collection_path, config):
    if not HAVE_TORCH and collection_path.name in NEEDS_TORCH:
        _not_collected.append(collection_path.name)
        return True
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo.value if call.excinfo is not None else None
    if not HAVE_TORCH and isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "torch":
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {NO_TORCH}")


def pytest_terminal_summary(terminalreporter):
    if _not_collected:
        terminalreporter.write_line(f"not collected ({NO_TORCH}): {', '.join(sorted(set(_not_collected)))}")
