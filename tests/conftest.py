"""Session-wide fixtures shared by the test modules."""

import pytest

from tests.dist_scripts.train_helpers import build_sample


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """A small real dataset built once per session by data_prep/build.py's sample mode (vocab 8192)."""
    return build_sample(tmp_path_factory.mktemp("data") / "sample")
