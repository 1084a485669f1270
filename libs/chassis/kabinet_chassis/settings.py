"""Settings from the environment, validated at start (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StackSettings(BaseSettings):
    """Where the dev stack lives, or which external servers replace it."""

    model_config = SettingsConfigDict(env_prefix="KABINET_", extra="ignore")

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

    model_config = SettingsConfigDict(env_prefix="KABINET_", extra="ignore")

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
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    # eventsourcing runs in worker threads; the limiter and the connection pool share this size.
    worker_threads: int = Field(default=8, ge=1, le=64)
    # Container objects allocated between young garbage collections (runtime.py says why).
    gc_young_threshold: int = Field(default=10_000, ge=700, le=1_000_000)
    # Base64 AES key for applications that hold PII (dev keys are generated at first run).
    cipher_key: str | None = None
    # Base64 key (32 bytes or more) of the keyed hash chain that seals the event history
    # (history_seals.py). Keep it out of the database and give it to auditors; without it,
    # the development key generated at first run under data_dir/keys.
    history_seal_key: str | None = None
    # The seal keys it replaced, base64 separated by commas: seals made before a rotation
    # are checked with them (never sealed with).
    history_seal_previous_keys: str | None = None
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
        if urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("KABINET_DATABASE_URL must look like postgresql://user:password@host:port/db")
        return value

    @field_validator("history_seal_key", "history_seal_previous_keys")
    @classmethod
    def _seal_keys(cls, value: str | None, info: ValidationInfo) -> str | None:
        from kabinet_chassis.history_seals import parse_key, previous_keys  # they refuse a short or malformed key by name

        for key in (previous_keys(value) if info.field_name == "history_seal_previous_keys" else [value] if value else []):
            parse_key(key)
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
