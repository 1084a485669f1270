"""Access tokens for tests, signed with the development key of the services' data dir."""

from __future__ import annotations

from pathlib import Path

from kabinet_chassis.auth import dev_signing_key, issue_access_token
from kabinet_contracts.roles import LEDGER_POST

# Longer than a token identity would issue: a fixture's client lives as long as its (slowest) test.
TEST_TOKEN_TTL_S = 3600


def bearer(data_dir: Path, subject: str, roles: tuple[str, ...] = ()) -> dict[str, str]:
    """An Authorization header for `subject` (a customer, or a service with its roles)."""
    token = issue_access_token(dev_signing_key(data_dir), subject, roles, ttl_s=TEST_TOKEN_TTL_S)
    return {"Authorization": f"Bearer {token}"}


def ledger_poster(data_dir: Path) -> dict[str, str]:
    """The header of a service that moves money in the ledger (as payments or cards do)."""
    return bearer(data_dir, "payments", (LEDGER_POST,))
