"""Rules of the services' settings: a setting that does not hold is refused at start, by
name, in one line; and never echoed, for a database URL holds a password and a seal key is
a private key."""

from __future__ import annotations

import re

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from kabinet_chassis.ed25519_keys import new_private_pem
from kabinet_chassis.settings import ServiceSettings
from ledger import cli


@pytest.mark.parametrize(("database_url", "says"), [
    ("postgresql://bank:s3cret@127.0.0.1:notaport/ledger", "has a bad port (Port could not be cast to integer"),
    ("postgresql://bank:s3cret@127.0.0.1:99999/ledger", "has a bad port (Port out of range 0-65535)"),
    ("mysql://bank:s3cret@127.0.0.1:3306/ledger", "must look like postgresql://"),
])
def test_a_database_url_that_cannot_be_used_is_refused_by_name_without_its_password(database_url, says):
    with pytest.raises(ValidationError, match=f"database_url[\\s\\S]*{re.escape(says)}") as refused:
        ServiceSettings(service_name="ledger", database_url=database_url, kafka_bootstrap_servers="k:9092")
    assert "s3cret" not in str(refused.value)


def test_a_seal_key_refused_is_not_shown_in_the_error():
    not_ed25519 = new_private_pem().decode().replace("A", "B", 3)  # a private key's PEM, spoilt
    with pytest.raises(ValidationError, match="history_seal_key") as refused:
        ServiceSettings(service_name="ledger", database_url="postgresql://u@h/db", kafka_bootstrap_servers="k:9092",
                        history_seal_key=not_ed25519)
    assert "PRIVATE KEY" not in str(refused.value)


def test_a_ledger_command_with_a_bad_database_port_says_so_in_one_line_exit_2(monkeypatch):
    monkeypatch.setenv("KABINET_DATABASE_URL", "postgresql://bank:s3cret@127.0.0.1:notaport/ledger")
    kabinet = typer.Typer()
    kabinet.add_typer(cli.app, name="ledger")
    for command in ("verify", "events", "rebuild-read-model"):
        result = CliRunner().invoke(kabinet, ["ledger", command])
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert "bad port" in result.output and "s3cret" not in result.output and "Traceback" not in result.output
