"""The API gateway: the one public entry for client apps (health, OpenAPI at /docs)."""

from __future__ import annotations

import httpx
from fastapi import APIRouter
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gateway.customer_rate_limits import CustomerRateLimits
from gateway.routes import LedgerClient, build_router
from kabinet_chassis.auth import verifier_for
from kabinet_chassis.health import CHECK_TIMEOUT_S, Check, database_check
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from kabinet_chassis.topology import GATEWAY_PORT, SERVICE_PORTS, service_url


class GatewaySettings(ServiceSettings):
    # A refused setting is named, never echoed: a database URL holds a password, a seal key is a private key.
    model_config = SettingsConfigDict(env_prefix="KABINET_", extra="ignore", hide_input_in_errors=True)

    service_name: str = "gateway"
    http_port: int = GATEWAY_PORT
    ledger_url: str = Field(default_factory=lambda: service_url("ledger"))
    # Requests one customer may make through this gateway process (customer_rate_limits.py).
    customer_requests_per_second: int = Field(default=20, gt=0)
    customer_requests_per_minute: int = Field(default=300, gt=0)


def backend_check(name: str, base_url: str) -> Check:
    async def check() -> str:
        # Above a service's own worst readiness answer (CHECK_TIMEOUT_S), within the gateway's gating budget.
        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S + 1.0) as client:
            response = await client.get(f"{base_url}/health/ready")
        response.raise_for_status()
        return f"{name} ready at {base_url}"

    return check


def build(settings: GatewaySettings, ledger_transport: httpx.AsyncBaseTransport | None = None) -> Service:
    # The one public entry: its readiness names no server, address or error to whoever asks.
    service = Service(settings, title="Kabinet API gateway", uses_database=False, shows_health_detail=False)
    # The gateway owns no database; readiness still reports (watches) the PostgreSQL server
    # the bank runs on. The services behind it gate its readiness: without them it serves nothing.
    service.watched["database"] = database_check(settings.database_url)
    for name in SERVICE_PORTS:
        service.checks[name] = backend_check(name, getattr(settings, f"{name}_url"))
    verifier = verifier_for(settings)
    ledger_http = httpx.AsyncClient(base_url=settings.ledger_url, transport=ledger_transport)

    @service.on_stop
    async def close_clients(_: Service) -> None:
        await ledger_http.aclose()

    root = APIRouter()

    @root.get("/", include_in_schema=False)
    async def index() -> dict[str, str]:
        return {"service": "kabinet-gateway", "docs": "/docs", "health": "/health/ready"}

    rate_limits = CustomerRateLimits(settings.customer_requests_per_second, settings.customer_requests_per_minute)
    service.routers += [root, build_router(LedgerClient(ledger_http), verifier.dependency(), rate_limits)]
    return service


def create_app():
    return build(GatewaySettings()).http_app()
