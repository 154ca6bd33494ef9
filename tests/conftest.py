"""Shared test fixtures: where ../shared lives, and float64 / NumPy defaults."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# CI runs on a clean clone with ../shared beside it; ADGM_SHARED points elsewhere if needed.
SHARED = pathlib.Path(os.environ.get("ADGM_SHARED", ROOT.parent / "shared"))


@pytest.fixture
def shared_dir():
    assert SHARED.is_dir(), f"the shared folder {SHARED} is missing (set ADGM_SHARED)"
    return SHARED


@pytest.fixture
def data_dir(shared_dir):
    """The project's --data-dir for tests: ../shared/data, which holds mnist/."""
    return shared_dir / "data"


@pytest.fixture
def fixtures_dir(shared_dir):
    return shared_dir / "fixtures"


@pytest.fixture(autouse=True)
def numpy_backend():
    """Every test starts on NumPy with a fixed seed, whatever ADGM_DEVICE says."""
    import autodiff
    autodiff.use_array_module(autodiff.np, seed=0)
    yield
    autodiff.use_array_module(autodiff.np, seed=0)
