"""The API gateway: the one public entry for client apps (health, OpenAPI at /docs)."""

from __future__ import annotations

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kabinet_chassis.health import Check, database_check
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from kabinet_chassis.topology import GATEWAY_PORT, SERVICE_PORTS, service_url


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KABINET_", extra="ignore")

    service_name: str = "gateway"
    http_port: int = GATEWAY_PORT
    ledger_url: str = Field(default_factory=lambda: service_url("ledger"))


def backend_check(name: str, base_url: str) -> Check:
    async def check() -> str:
        async with httpx.AsyncClient(timeout=2.0) as client:
            response = await client.get(f"{base_url}/health/ready")
        response.raise_for_status()
        return f"{name} ready at {base_url}"

    return check


def build(settings: GatewaySettings) -> Service:
    service = Service(settings, title="Kabinet API gateway", uses_database=False)
    # The gateway owns no database; readiness still reports the PostgreSQL server the bank runs on.
    service.checks["database"] = database_check(settings.database_url)
    for name in SERVICE_PORTS:
        service.checks[name] = backend_check(name, getattr(settings, f"{name}_url"))
    from gateway.routes import router

    service.routers.append(router)
    return service


def create_app():
    return build(GatewaySettings()).http_app()
