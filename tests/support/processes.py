"""Reading and signalling other processes in tests (psutil)."""

from __future__ import annotations

import signal
from collections.abc import Iterable
from pathlib import Path

import psutil


def command_line(process: psutil.Process) -> str:
    """A process's command line; "" for one gone a moment ago, a zombie without one (a
    PostgreSQL backend whose client just left: ZombieProcess is a NoSuchProcess)."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def postgres_server_processes(data_dir: Path) -> list[psutil.Process]:
    """The postmaster of the PostgreSQL server on data_dir and every process it forked."""
    postmaster = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def signal_each(processes: Iterable[psutil.Process], sig: signal.Signals) -> None:
    """Sends sig to each process still there. A backend whose client left after the listing is
    gone already (seen in CI): for a kill or a stop, that is as good as done."""
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
