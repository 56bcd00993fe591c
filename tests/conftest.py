"""Test-wide settings: nothing a test runs writes outside the test's temporary folders."""
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_dir_in_tmp(tmp_path_factory):
    """Image-header caches (src/data/image_io.py, default under $XDG_CACHE_HOME) go to a temporary folder, also
    for the train.py subprocesses some tests start."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
