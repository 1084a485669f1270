"""Which services `kabinet up` starts, in order, and where they listen.

The gateway is the one public entry; the others listen on loopback for it and for
each other. Each service module `<name>.service` has `create_app()`, which uvicorn calls (--factory).
"""

GATEWAY_PORT = 8000
SERVICE_PORTS: dict[str, int] = {
    "ledger": 8101,
}


def service_url(name: str) -> str:
    return f"http://127.0.0.1:{SERVICE_PORTS[name]}"
