from __future__ import annotations

import httpx
import pytest

from ledger.service import build
from tests.support.tokens import ledger_poster


@pytest.fixture
async def ledger(stack, unique_name):
    """A running ledger service on its own database, and an HTTP client for it."""
    settings = stack.service_settings(f"ledger_{unique_name}")
    service, parts = build(settings)
    async with service.running():
        app = service.http_app()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ledger/ledger/v1",
                                     headers=ledger_poster(settings.data_dir)) as client:
            client.parts = parts
            client.settings = settings
            yield client
