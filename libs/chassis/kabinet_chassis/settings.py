"""Settings from the environment, validated at start (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kabinet_chassis.ed25519_keys import load_private_key, load_public_keys


class StackSettings(BaseSettings):
    """Where the dev stack lives, or which external servers replace it."""

    # A refused setting is named, never echoed: a database URL holds a password, a seal key is a private key.
    model_config = SettingsConfigDict(env_prefix="KABINET_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Path(".data")
    pg_port: int = Field(default=55432, ge=1, le=65535)
    broker_port: int = Field(default=59092, ge=1, le=65535)
    # Set these to use real servers instead of the embedded ones.
    database_url: str | None = None
    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "KABINET_KAFKA_BOOTSTRAP_SERVERS")
    )


class ServiceSettings(BaseSettings):
    """What one service process needs; `kabinet up` passes these in its environment."""

    # A refused setting is named, never echoed: a database URL holds a password, a seal key is a private key.
    model_config = SettingsConfigDict(env_prefix="KABINET_", extra="ignore", hide_input_in_errors=True)

    service_name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    # The PostgreSQL *server*; each service uses its own database on it.
    database_url: str
    kafka_bootstrap_servers: str = Field(
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "KABINET_KAFKA_BOOTSTRAP_SERVERS")
    )
    # Tansu (the embedded broker) has no idempotent producer; Apache Kafka does.
    kafka_enable_idempotence: bool = False
    # Replicas of each topic a service creates: the embedded broker is one node; a
    # production cluster wants 3 (a majority of them in sync before a record counts).
    kafka_replication_factor: int = Field(default=1, ge=1, le=7)
    # How long the broker waits for a consumer that stopped heartbeating before it gives the
    # consumer's partitions to another copy of it. A consumer joining its group waits too:
    # the embedded broker holds a join for half of this, for the rest of the group to join.
    # Apache Kafka refuses less than its group.min.session.timeout.ms (6 s unless changed).
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000, le=300_000)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    # eventsourcing runs in worker threads; the limiter and the connection pool share this size.
    worker_threads: int = Field(default=8, ge=1, le=64)
    # Container objects allocated between young garbage collections (runtime.py says why).
    gc_young_threshold: int = Field(default=10_000, ge=700, le=1_000_000)
    # Base64 AES key for applications that hold PII (dev keys are generated at first run).
    cipher_key: str | None = None
    # PEM of the Ed25519 private key that signs the seals of the event history
    # (history_seals.py; `openssl genpkey -algorithm ed25519`). Keep it out of the database;
    # give auditors its public key. Without it, the development key generated at first run
    # under data_dir/keys.
    history_seal_key: str | None = None
    # PEM public keys of the seal keys it replaced, one after the other: seals signed before
    # a rotation are checked with them. An auditor's check needs only public keys.
    history_seal_public_keys: str | None = None
    # PEM of identity's Ed25519 public key, which every service checks access tokens with
    # (while identity rotates its key, the old and the new one after each other); without
    # it, the development key generated at first run under data_dir/keys.
    jwt_public_key: str | None = None
    data_dir: Path = Path(".data")
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        url = urlsplit(value)
        try:
            _ = url.port  # parsed lazily: a port that is no number would fail far from here, as a traceback
        except ValueError as error:
            raise ValueError(f"KABINET_DATABASE_URL has a bad port ({error}); it must look like"
                             " postgresql://user:password@host:port/db") from None
        if url.scheme not in ("postgresql", "postgres"):
            raise ValueError("KABINET_DATABASE_URL must look like postgresql://user:password@host:port/db")
        return value

    @field_validator("history_seal_key")
    @classmethod
    def _seal_key(cls, value: str | None) -> str | None:
        if value:
            load_private_key(value, "the history seal key")  # refused at start, by name
        return value

    @field_validator("history_seal_public_keys")
    @classmethod
    def _seal_public_keys(cls, value: str | None) -> str | None:
        from kabinet_chassis.history_seals import PUBLIC_KEYS_MAX, SEAL_PUBLIC_KEYS_WHAT  # it imports this module

        if value:
            load_public_keys(value, SEAL_PUBLIC_KEYS_WHAT, PUBLIC_KEYS_MAX)
        return value

    @property
    def service_database_url(self) -> str:
        return database_url_for(self.database_url, self.service_name)


def database_name_for(service_name: str) -> str:
    return f"kabinet_{service_name}"


def database_url_for(server_url: str, service_name: str) -> str:
    """The URL of one service's own database on the given server."""
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database_name_for(service_name), parts.query, ""))
