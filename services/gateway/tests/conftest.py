from __future__ import annotations

import httpx
import pytest

from gateway.service import GatewaySettings, build
from kabinet_chassis.auth import dev_signing_key
from ledger.service import build as build_ledger
from tests.support.tokens import ledger_poster


@pytest.fixture
async def bank(stack, unique_name, tmp_path):
    """The gateway in front of a real ledger, both trusting the development key of `tmp_path`
    (`bank.key` signs customers' tokens); `bank.ledger` asks the ledger directly, as the
    bank's services do, with a service's token."""
    ledger_service, ledger_parts = build_ledger(stack.service_settings(f"ledger_{unique_name}", data_dir=tmp_path))
    async with ledger_service.running():
        ledger_transport = httpx.ASGITransport(app=ledger_service.http_app())
        settings = GatewaySettings(database_url=stack.database_url, kafka_bootstrap_servers=stack.bootstrap_servers,
                                   data_dir=tmp_path, ledger_url="http://ledger")
        gateway = build(settings, ledger_transport=ledger_transport)
        async with (
            gateway.running(),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.http_app()), base_url="http://gw") as client,
            httpx.AsyncClient(transport=ledger_transport, base_url="http://ledger/ledger/v1",
                              headers=ledger_poster(tmp_path)) as ledger,
        ):
            client.ledger = ledger
            client.key = dev_signing_key(tmp_path)
            client.ledger_parts = ledger_parts
            yield client
