"""Development keys: generated at first run under data_dir/keys (never committed; their
file names say so), so that `make run` and the tests need no secret from anyone."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def dev_key_path(data_dir: Path, file_name: str) -> Path:
    """Where the development key `file_name` of a data dir is, whether or not it was made."""
    return data_dir / "keys" / file_name


def dev_key_file(data_dir: Path, file_name: str, generate: Callable[[], bytes]) -> bytes:
    """The bytes of data_dir/keys/file_name, written once by `generate`, readable by its
    owner only. Two processes starting at once (the services of `make run`) each write their
    own file and link it into place: the first link wins, and both read that key, whole."""
    path = dev_key_path(data_dir, file_name)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Its own name: two containers sharing the data dir may both run as pid 1.
        written = path.with_name(f"{file_name}.{os.getpid()}.{secrets.token_hex(8)}")
        # Created owner-only, never chmod'ed after: another user could open it in between and keep reading.
        with os.fdopen(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as key_file:
            key_file.write(generate())
        try:
            os.link(written, path)
        except FileExistsError:
            pass
        finally:
            written.unlink()
    return path.read_bytes()
