"""Development keys sign tokens that move money on a developer's bank (`make run`): no
other user of the machine may read one, not even for a moment while it is written; and a
service that trusts one says so in its log, where a deployment that forgot its keys shows."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kabinet_chassis.auth import verifier_for
from kabinet_chassis.dev_keys import dev_key_file
from kabinet_chassis.ed25519_keys import public_pem
from kabinet_chassis.settings import ServiceSettings


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


def test_a_service_trusting_the_development_token_key_says_so_in_its_log_and_one_given_identitys_does_not(
        tmp_path, caplog):
    # A deployment that forgot KABINET_JWT_PUBLIC_KEY trusts a key generated on its own disk.
    settings = ServiceSettings(service_name="gateway", database_url="postgresql://u@h/db",
                               kafka_bootstrap_servers="k:9092", data_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="kabinet_chassis.auth"):
        verifier_for(settings)
        [warning] = [record.getMessage() for record in caplog.records]
        assert "gateway trusts access tokens signed with the DEVELOPMENT key" in warning
        assert "KABINET_JWT_PUBLIC_KEY" in warning
        caplog.clear()
        identitys = public_pem(Ed25519PrivateKey.generate())
        verifier_for(settings.model_copy(update={"jwt_public_key": identitys}))
        assert caplog.records == []
