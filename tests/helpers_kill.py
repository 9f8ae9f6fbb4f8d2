"""SIGKILL a real `dirl` command at a chosen point of its work: what a cluster's OOM killer, a
pre-empted node or a cancelled job delivers. No handler runs, so only the design keeps outputs sound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kill_at(patch: str, argv: list[str], marker: Path, timeout: float = 300) -> None:
    """Run `dirl <argv>` in a fresh interpreter after executing `patch`, which wraps one function so
    that it calls `pause()` at the point to kill; SIGKILL the process there.

    `pause()` creates `marker` and sleeps, so the kill lands while the command is mid-write."""
    script = "\n".join(
        [
            "import time",
            f"def pause():\n    open({str(marker)!r}, 'w').close()\n    time.sleep(600)",
            textwrap.dedent(patch),
            "from dirl.cli import main",
            f"main({argv!r})",
        ]
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"dirl {argv[0]} ended before the kill point:\n{proc.stderr.read().decode()[-3000:]}"
                )
            assert time.time() < deadline, "kill point never reached"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def in_progress(final: Path) -> bool:
    """Whether a killed writer of `final` left its temporary output behind."""
    from dirl.store import leftovers

    return any(".tmp-" in p.name for p in leftovers(final))


def stopped_at(patch: str, argv: list[str], marker: Path, timeout: float = 300) -> subprocess.Popen:
    """Run `dirl <argv>` like `kill_at`, but SIGSTOP it at the pause point instead of killing it: an
    orphaned job frozen mid-write. The caller resumes it with SIGCONT (`pause()` then returns)."""
    script = "\n".join(
        [
            "import time",
            f"def pause():\n    open({str(marker)!r}, 'w').close()\n    time.sleep(1)",
            textwrap.dedent(patch),
            "from dirl.cli import main",
            f"raise SystemExit(main({argv!r}))",
        ]
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"dirl {argv[0]} ended before the stop point:\n{proc.stderr.read().decode()[-3000:]}")
        assert time.time() < deadline, "stop point never reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)
    return proc
