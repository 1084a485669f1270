"""Access tokens: short-lived JWTs signed with EdDSA (Ed25519), verified here.

Identity signs them (its own issue); until it runs, `kabinet` generates a clearly
marked development key pair at first run under `.data/keys/` so the gateway and tests
can work. Never ship that key: production passes KABINET_JWT_PUBLIC_KEY (PEM; while identity
rotates its key, the old and the new PEM one after the other).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Request
from fastapi.security import HTTPBearer

from kabinet_chassis.dev_keys import dev_key_file
from kabinet_chassis.ed25519_keys import load_private_key, load_public_keys, new_private_pem, public_pem
from kabinet_chassis.errors import Problem
from kabinet_chassis.settings import ServiceSettings

log = logging.getLogger(__name__)

ISSUER = "kabinet-identity"
AUDIENCE = "kabinet"
ACCESS_TOKEN_TTL_S = 300
# Identity's clock and ours differ a little (and `iat` is truncated to whole seconds), so
# without an allowance a token issued this very moment can look issued in our future
# (PyJWT refuses an `iat` ahead of now): the customer's first call after login got 401.
# Small against the token's lifetime; applies to exp, nbf and iat alike.
CLOCK_SKEW_S = 5
# The longest life a token may be issued with (exp − iat), whoever signed it: a token minted
# for a year by a misconfigured issuer or a leaked key's holder is refused, not honoured until
# it expires. A day: a service's own token or a developer's (`kabinet dev-token`) at most.
ACCESS_TOKEN_LIFETIME_MAX_S = 24 * 3600
_DEV_KEY_FILE = "dev-ed25519-DO-NOT-USE-IN-PRODUCTION.pem"
# The longest customer id an account can have (the ledger's owner_id, the events' customer_id).
SUBJECT_LENGTH_MAX = 128
# Trusted at once: the old and the new key of a rotation, with room for a rollback.
PUBLIC_KEYS_MAX = 4
# A JWS in compact form: three base64url parts. Anything else is refused before decoding:
# base64 decoding skips stray characters, so a token followed by a non-ASCII space (0xA0)
# would verify, and the gateway would then fail to pass its header on to the ledger (a 500).
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_DECODE_RULES = {"algorithms": ["EdDSA"], "audience": AUDIENCE, "issuer": ISSUER, "leeway": CLOCK_SKEW_S,
                 "options": {"require": ["exp", "iat", "sub"]}}


@dataclass(frozen=True)
class Principal:
    customer_id: str
    roles: tuple[str, ...] = ()


def _is_customer_id(subject: object) -> bool:
    """What an account's owner and an event's `requested_by` can be: PostgreSQL text and UTF-8."""
    if not isinstance(subject, str) or not 1 <= len(subject) <= SUBJECT_LENGTH_MAX or "\x00" in subject:
        return False
    try:
        subject.encode("utf-8")  # a lone surrogate (JSON "\ud800") cannot be
    except UnicodeEncodeError:
        return False
    return True


def dev_signing_key(data_dir: Path) -> Ed25519PrivateKey:
    """The development signing key, generated at first run (never committed)."""
    return load_private_key(dev_key_file(data_dir, _DEV_KEY_FILE, new_private_pem), "the development signing key")


def issue_access_token(key: Ed25519PrivateKey, customer_id: str, roles: tuple[str, ...] = (),
                       ttl_s: int = ACCESS_TOKEN_TTL_S) -> str:
    now = int(time.time())
    claims = {"sub": customer_id, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl_s, "roles": list(roles)}
    return jwt.encode(claims, key, algorithm="EdDSA")


def verifier_for(settings: ServiceSettings) -> TokenVerifier:
    """The verifier of a service: identity's public key(s) from its settings, or the development key."""
    if settings.jwt_public_key:
        return TokenVerifier(settings.jwt_public_key)
    # Said where operators look: a deployment that forgot the setting trusts a key generated on its own disk.
    log.warning("%s trusts access tokens signed with the DEVELOPMENT key under %s; in production, set"
                " KABINET_JWT_PUBLIC_KEY to identity's public key", settings.service_name, settings.data_dir / "keys")
    return TokenVerifier(public_pem(dev_signing_key(settings.data_dir)))


class TokenVerifier:
    def __init__(self, public_key_pem: str) -> None:
        """`public_key_pem`: identity's public key, or while it rotates its signing key the old
        and the new one, one PEM after the other (tokens signed by the old one live on for
        their TTL)."""
        self.public_keys = load_public_keys(public_key_pem, "to verify access tokens with", PUBLIC_KEYS_MAX)

    def _claims(self, token: str) -> dict:
        """The token's claims, checked with whichever trusted key signed it (the signature is
        checked before any claim, so a claim's error comes from the key that signed it)."""
        *others, last = self.public_keys
        for key in others:
            try:
                return jwt.decode(token, key, **_DECODE_RULES)
            except jwt.InvalidSignatureError:
                continue
        return jwt.decode(token, last, **_DECODE_RULES)

    def verify(self, token: str) -> Principal:
        if not _COMPACT_JWS.fullmatch(token):
            raise Problem(401, "invalid_token", "the access token is not a JWT in compact form (three base64url parts)",
                          headers={"WWW-Authenticate": "Bearer"})
        try:
            claims = self._claims(token)
        except jwt.ExpiredSignatureError:
            raise Problem(401, "token_expired", "the access token has expired; refresh it",
                          headers={"WWW-Authenticate": "Bearer"}) from None
        except jwt.InvalidTokenError as error:
            raise Problem(401, "invalid_token", f"the access token is not valid: {error}",
                          headers={"WWW-Authenticate": "Bearer"}) from None
        # NumericDate is a JSON number (RFC 7519); PyJWT takes a string of digits as well.
        if not all(isinstance(claims[name], int | float) and not isinstance(claims[name], bool) for name in ("exp", "iat")):
            raise Problem(401, "invalid_token", "the access token's exp and iat are not numbers of seconds",
                          headers={"WWW-Authenticate": "Bearer"})
        if claims["exp"] - claims["iat"] > ACCESS_TOKEN_LIFETIME_MAX_S:
            raise Problem(401, "invalid_token", f"the access token was issued to live longer than"
                          f" {ACCESS_TOKEN_LIFETIME_MAX_S // 3600} h (exp − iat); ask identity for a new one",
                          headers={"WWW-Authenticate": "Bearer"})
        subject = claims["sub"]
        # A well-signed token can still name a subject no customer can be: checked here, it is
        # a bad token (401), not a 422 about a field the caller never sent, from a service deeper in.
        if not _is_customer_id(subject):
            raise Problem(401, "invalid_token", f"the access token's subject is not a customer id (1 to"
                          f" {SUBJECT_LENGTH_MAX} characters of UTF-8, no NUL)", headers={"WWW-Authenticate": "Bearer"})
        roles = claims.get("roles", [])
        # Taken as identity made them, a list of role names: a string would be read as one role per letter.
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise Problem(401, "invalid_token", "the access token's roles are not a list of role names",
                          headers={"WWW-Authenticate": "Bearer"})
        return Principal(customer_id=subject, roles=tuple(roles))

    def dependency(self) -> BearerToken:
        """FastAPI dependency giving the caller's Principal from `Authorization: Bearer …`."""
        return BearerToken(self)


class BearerToken(HTTPBearer):
    """The access token, declared in the OpenAPI document as the bearer scheme (FastAPI's
    HTTPBearer). Its check is ours: a missing or other header is our 401 `unauthorized`
    problem, not HTTPBearer's bare error, and "Bearer " with no token an `invalid_token`."""

    def __init__(self, verifier: TokenVerifier) -> None:
        super().__init__(scheme_name="accessToken", bearerFormat="JWT",
                         description="An access token from identity (EdDSA-signed JWT, minutes long)."
                                     " Refused with a 401 problem: `unauthorized` (none sent), `invalid_token`,"
                                     " `token_expired` (refresh it).")
        self.verifier = verifier

    # Not async, as HTTPBearer's is: verifying a signature is CPU work, kept off the event loop.
    def __call__(self, request: Request) -> Principal:
        authorization = request.headers.get("authorization")
        # RFC 9110 §11.1: the scheme is case-insensitive ("bearer" is "Bearer"); one or more spaces follow it.
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            raise Problem(401, "unauthorized", "send an access token: Authorization: Bearer <token>",
                          headers={"WWW-Authenticate": "Bearer"})
        return self.verifier.verify(token.strip(" \t"))  # RFC 9110's optional whitespace, not Unicode's
