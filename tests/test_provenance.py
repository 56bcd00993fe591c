"""src/misc/provenance.py: the commit recorded with a figure (bench/latency_bench.py, tools/bias_experiment.py)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from src.misc.provenance import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_the_recorded_commit_is_head_and_dirty_only_for_tracked_changes_outside_the_results(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "docs" / "results" / "r.json").write_text("{}\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "docs" / "results" / "r.json").write_text('{"run": 2}\n')   # a tool's own output
    (tmp_path / "untracked.txt").write_text("scratch\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"
