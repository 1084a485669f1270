"""Rules of access tokens (no servers needed): the clocks of identity and of the services
that verify its tokens differ by a little, and that little must not log a customer out;
a token is only as good as the customer id it names."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from kabinet_chassis.auth import (
    ACCESS_TOKEN_LIFETIME_MAX_S,
    AUDIENCE,
    CLOCK_SKEW_S,
    ISSUER,
    SUBJECT_LENGTH_MAX,
    TokenVerifier,
    public_pem,
    verifier_for,
)
from kabinet_chassis.cli import app
from kabinet_chassis.errors import Problem
from kabinet_chassis.settings import ServiceSettings

KEY = Ed25519PrivateKey.generate()
VERIFIER = TokenVerifier(public_pem(KEY))


def token_issued_at(issued_at: int, ttl_s: int = 300) -> str:
    claims = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": issued_at, "exp": issued_at + ttl_s}
    return jwt.encode(claims, KEY, algorithm="EdDSA")


def test_a_token_just_issued_by_an_identity_whose_clock_is_a_little_ahead_is_accepted():
    # Identity's clock 2 s ahead (or only in a later second than ours): its `iat` is in our future.
    assert VERIFIER.verify(token_issued_at(int(time.time()) + 2)).customer_id == "alice"


def test_a_token_expired_longer_ago_than_the_clock_skew_allowance_is_refused():
    with pytest.raises(Problem) as refused:
        VERIFIER.verify(token_issued_at(int(time.time()) - 300 - CLOCK_SKEW_S - 2))
    assert refused.value.status == 401 and refused.value.code == "token_expired"


def test_a_token_issued_further_in_the_future_than_the_allowance_is_refused():
    with pytest.raises(Problem) as refused:
        VERIFIER.verify(token_issued_at(int(time.time()) + CLOCK_SKEW_S + 60))
    assert refused.value.status == 401 and refused.value.code == "invalid_token"


def test_a_token_issued_to_live_longer_than_a_day_is_refused_however_well_signed():
    with pytest.raises(Problem) as refused:
        VERIFIER.verify(token_issued_at(int(time.time()), ttl_s=ACCESS_TOKEN_LIFETIME_MAX_S + 1))
    assert refused.value.status == 401 and refused.value.code == "invalid_token"
    assert "longer than 24 h" in refused.value.detail
    assert VERIFIER.verify(token_issued_at(int(time.time()), ttl_s=ACCESS_TOKEN_LIFETIME_MAX_S)).customer_id == "alice"


def token_for(subject) -> str:
    now = int(time.time())
    claims = {"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return jwt.encode(claims, KEY, algorithm="EdDSA")


# A lone surrogate cannot be written as UTF-8: recorded as who asked, it would fail a whole batch.
@pytest.mark.parametrize("subject", ["", "c" * (SUBJECT_LENGTH_MAX + 1), "alice\x00bob", "alice\ud800"],
                         ids=["empty", "too-long", "nul", "lone-surrogate"])
def test_a_signed_token_whose_subject_no_customer_can_have_is_an_invalid_token(subject):
    with pytest.raises(Problem) as refused:
        VERIFIER.verify(token_for(subject))
    assert refused.value.status == 401 and refused.value.code == "invalid_token"


def test_a_subject_of_the_longest_customer_id_is_accepted():
    assert VERIFIER.verify(token_for("c" * SUBJECT_LENGTH_MAX)).customer_id == "c" * SUBJECT_LENGTH_MAX


def test_a_developer_token_from_the_command_line_is_trusted_only_by_services_on_the_same_development_key(
        tmp_path, monkeypatch):
    monkeypatch.setenv("KABINET_DATA_DIR", str(tmp_path / "dev"))
    printed = CliRunner().invoke(app, ["dev-token", "payments", "--role", "ledger:post", "--ttl-s", "60"])
    assert printed.exit_code == 0, printed.output
    token = printed.output.strip()

    def settings(data_dir):
        return ServiceSettings(service_name="ledger", database_url="postgresql://unused@127.0.0.1:1/postgres",
                               kafka_bootstrap_servers="unused:9092", data_dir=data_dir)

    me = verifier_for(settings(tmp_path / "dev")).verify(token)
    assert me.customer_id == "payments" and me.roles == ("ledger:post",)
    with pytest.raises(Problem) as refused:
        verifier_for(settings(tmp_path / "elsewhere")).verify(token)
    assert refused.value.status == 401
