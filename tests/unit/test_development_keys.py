"""Development keys sign tokens that move money on a developer's bank (`make run`): no
other user of the machine may read one, not even for a moment while it is written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kabinet_chassis.dev_keys import dev_key_file


def test_a_development_key_is_readable_by_its_owner_alone_from_the_moment_it_is_written(tmp_path, monkeypatch):
    modes_seen: list[int] = []  # of every key file there is, whenever another user could look

    def key_files_modes() -> list[int]:
        return [stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "keys").iterdir()]

    def generate() -> bytes:
        modes_seen.extend(key_files_modes())
        return b"private key"

    real_chmod = Path.chmod

    def chmod_watched(path: Path, mode: int, **kwargs) -> None:
        modes_seen.append(stat.S_IMODE(path.stat().st_mode))  # as it stood until this chmod
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", chmod_watched)
    usual_umask = os.umask(0o022)
    try:
        assert dev_key_file(tmp_path, "dev-test.pem", generate) == b"private key"
    finally:
        os.umask(usual_umask)
    modes_seen.extend(key_files_modes())
    assert modes_seen and all(mode & 0o077 == 0 for mode in modes_seen), [oct(mode) for mode in modes_seen]
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) & 0o077 == 0, "the keys directory is open to others"
