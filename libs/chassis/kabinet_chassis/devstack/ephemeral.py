"""A throwaway stack for tests and benchmarks: its own PostgreSQL and broker on free ports.

Or the servers named by KABINET_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS when set.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from kabinet_chassis.devstack.broker import EmbeddedBroker
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.settings import ServiceSettings

# A consumer's join waits half its session timeout on the embedded broker (5 s at the
# default), and many tests start one; 3 s still leaves a heartbeat every second.
EMBEDDED_BROKER_SESSION_TIMEOUT_MS = 3_000


def remove_without_waiting(root: Path) -> None:
    """Moves `root` out of the way at once and removes it in a process of its own. By the end
    of a test run a stack's database holds gigabytes (a database per test), and on a disk
    mounted with `discard` unlinking them kept the run waiting for half a minute."""
    # A name that does not start with root's: whatever looks for processes naming root (its
    # servers, to kill them) must not find the removal.
    removing = root.with_name(f".removing-{root.name}")
    try:
        root.rename(removing)
    except FileNotFoundError:
        return
    subprocess.Popen(["rm", "-rf", "--", str(removing)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


class EphemeralStack:
    def __init__(self, prefix: str = "kabinet-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.external_database_url = os.environ.get("KABINET_DATABASE_URL")
        self.external_bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        self.postgres = EmbeddedPostgres(self.root / "pg", free_port())
        self.broker = EmbeddedBroker(free_port(), self.root / "broker.log")

    @property
    def database_url(self) -> str:
        return self.external_database_url or self.postgres.url

    @property
    def bootstrap_servers(self) -> str:
        return self.external_bootstrap or self.broker.bootstrap_servers

    def start(self) -> EphemeralStack:
        if not self.external_database_url:
            self.postgres.start()
        if not self.external_bootstrap:
            self.broker.start()
        return self

    def restart_broker_losing_data(self) -> None:
        if self.external_bootstrap:
            raise RuntimeError("restarting the broker needs the embedded broker (unset KAFKA_BOOTSTRAP_SERVERS)")
        self.broker.stop(kill=True)
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()
        self.postgres.stop(mode="immediate")
        remove_without_waiting(self.root)

    def service_settings(self, service_name: str, **overrides) -> ServiceSettings:
        """Settings of a service on this stack. Every service on it shares the stack's data
        dir, so they all trust the one development signing key (`dev_signing_key(root)`)."""
        return ServiceSettings(**{
            "service_name": service_name,
            "database_url": self.database_url,
            "kafka_bootstrap_servers": self.bootstrap_servers,
            "data_dir": self.root,
            **({} if self.external_bootstrap else {"kafka_session_timeout_ms": EMBEDDED_BROKER_SESSION_TIMEOUT_MS}),
            **overrides,
        })

    def __enter__(self) -> EphemeralStack:
        try:
            return self.start()
        except BaseException:
            self.stop()  # a server that did start must not outlive a failed start of the other
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
