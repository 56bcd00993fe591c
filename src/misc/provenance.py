"""Where a recorded figure came from: the commit of the checkout that measured it."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(repo: Path) -> str:
    """HEAD of the git checkout at ``repo``, with '+dirty' when tracked files other than docs/results/ (the
    tools' own outputs, which a run extends) differ from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/results"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
