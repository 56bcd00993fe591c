"""Test-wide settings: nothing a test runs writes outside the test's temporary folders."""
import os

import pytest
import torch


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


@pytest.fixture(autouse=True, scope="session")
def _threads_per_xdist_worker():
    """Under pytest-xdist (``make test`` runs 2 workers) each worker's in-process tests get cores / workers torch
    threads, so that two workers do not fight over the same cores with spinning thread pools."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))
    yield
