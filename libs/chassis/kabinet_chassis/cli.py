"""`kabinet`: the developer's command line (typer + rich).

Contexts add sub-commands through the `kabinet.cli` entry-point group
(e.g. `kabinet ledger verify`), so the chassis never imports a service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import typer
from rich.console import Console

from kabinet_chassis.auth import ACCESS_TOKEN_LIFETIME_MAX_S
from kabinet_chassis.devstack.broker import EmbeddedBroker
from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import LOOPBACK, port_is_free
from kabinet_chassis.devstack.stack import DevStack
from kabinet_chassis.health import GATING_CHECK_BUDGET_S
from kabinet_chassis.topology import GATEWAY_PORT, SERVICE_PORTS

console = Console()
err_console = Console(stderr=True)
app = typer.Typer(help="Kabinet: an open-source retail-bank backend.", no_args_is_help=True)
stack_app = typer.Typer(help="The database server and broker the bank runs on.", no_args_is_help=True)
docs_app = typer.Typer(help="Generated documentation.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(docs_app, name="docs")

READY_TIMEOUT_S = 90
# Longer than a service's clean stop, which ends its loops, the relay's producer (2 s at most
# with the broker gone) and the ledger's last sealing pass (10 s at most): killed sooner, the
# ledger would leave its last events unsealed.
STOP_TIMEOUT_S = 30
STACK_CHECKED_EVERY_S = 5.0  # how often `kabinet up` looks whether its database server and broker still run


def _fail(message: str) -> None:
    # One line whatever the terminal's width: it may be grepped from a log or a CI run.
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(1)


@stack_app.command("up")
def stack_up() -> None:
    """Start embedded PostgreSQL and the embedded broker (they keep running)."""
    try:
        endpoints, _ = DevStack().up()
    except StackError as error:
        _fail(str(error))
    console.print(f"database: {endpoints.database_url}\nbroker:   {endpoints.bootstrap_servers}")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the embedded PostgreSQL and broker."""
    DevStack().down()
    console.print("stack stopped")


@stack_app.command("status")
def stack_status() -> None:
    for name, state in DevStack().status().items():
        console.print(f"{name:9} {state}")


def _service_env(name: str, port: int, database_url: str, bootstrap: str) -> dict[str, str]:
    return {
        **os.environ,
        "KABINET_SERVICE_NAME": name,
        "KABINET_HTTP_PORT": str(port),
        "KABINET_DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "PYTHONUNBUFFERED": "1",
    }


def _spawn(name: str, port: int, env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", f"{name}.service:create_app",
         "--host", LOOPBACK, "--port", str(port), "--no-access-log"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        # A terminal's Ctrl-C (or its closing) reaches its whole foreground group. In a session of
        # its own, a service hears only the one SIGTERM this CLI sends: a second signal makes
        # uvicorn quit at once, without the service's clean stop.
        start_new_session=True,
    )


def _stop_children(children: dict[str, subprocess.Popen]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            err_console.print(f"{name} did not stop within {STOP_TIMEOUT_S} s of being asked; killed it", highlight=False)


def _stack_part_gone(stack: DevStack, database_is_ours: bool, broker: EmbeddedBroker | None) -> str | None:
    """The database server or broker `kabinet up` started, if it no longer runs: the bank
    would go on half alive (events piling up in the outbox, every read failing), saying nothing."""
    if broker is not None and not broker.is_running():
        return "the broker"
    if database_is_ours and not stack.postgres.is_running():
        return "PostgreSQL"
    return None


@app.command("up")
def up() -> None:
    """Run the whole bank: the stack, every service and the gateway. Ctrl-C stops it all."""
    ports = {**SERVICE_PORTS, "gateway": GATEWAY_PORT}
    for name, port in ports.items():
        if not port_is_free(port):
            _fail(f"port {port} for {name} is taken: stop what listens there (`ss -ltnp 'sport = :{port}'`)")
    stopping = {"now": False}

    def request_stop(signum, frame) -> None:
        stopping["now"] = True

    # Before anything starts: a Ctrl-C while the stack starts stops it all once it has (and a
    # closed terminal, SIGHUP, is a Ctrl-C too, not a death that leaves PostgreSQL running).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    stack = DevStack()
    # What `kabinet stack up` started keeps running, as it says: only what starts here stops here.
    database_was_running = stack.settings.database_url is None and stack.postgres.is_running()
    try:
        endpoints, started_broker = stack.up()
    except StackError as error:
        _fail(str(error))
    log_dir = stack.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: dict[str, subprocess.Popen] = {}
    try:
        for name, port in ports.items():
            if stopping["now"]:
                return
            children[name] = _spawn(name, port, _service_env(name, port, endpoints.database_url,
                                                              endpoints.bootstrap_servers), log_dir)
        gateway_url = f"http://{LOOPBACK}:{GATEWAY_PORT}"
        with console.status("starting services…"):
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and not stopping["now"]:
                crashed = [c for c in children.values() if c.poll() is not None]
                if crashed:
                    _fail(f"a service exited during start; see the logs in {log_dir}")
                try:
                    # Longer than the gateway's slowest readiness answer (health.GATING_CHECK_BUDGET_S).
                    if httpx.get(f"{gateway_url}/health/ready", timeout=GATING_CHECK_BUDGET_S + 1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            else:
                if not stopping["now"]:  # never "up" when it is not: stop it all and say where to look
                    _fail(f"the gateway was not ready after {READY_TIMEOUT_S}s; see the logs in {log_dir}")
        if stopping["now"]:
            return
        console.print(f"Kabinet is up. Gateway: {gateway_url}  (OpenAPI: {gateway_url}/docs; logs: {log_dir})")
        console.print("Press Ctrl-C to stop.")
        stack_checked_at = time.monotonic()
        while not stopping["now"]:
            exited = [name for name, child in children.items() if child.poll() is not None]
            if exited:  # a failure, whatever its exit code: the bank is no longer whole
                _fail(f"{', '.join(exited)} exited; stopped everything. See the logs in {log_dir}")
            if time.monotonic() - stack_checked_at >= STACK_CHECKED_EVERY_S:
                gone = _stack_part_gone(stack, endpoints.database_is_embedded, started_broker)
                if gone:
                    _fail(f"{gone} exited; stopped everything. See the logs in {stack.data_dir}")
                stack_checked_at = time.monotonic()
            time.sleep(0.5)
    finally:
        console.print("stopping…")
        _stop_children(children)
        if started_broker is not None:
            stack.stop_broker(started_broker)
        if endpoints.database_is_embedded and not database_was_running:
            stack.postgres.stop()
        console.print("stopped")


@docs_app.command("asyncapi")
def docs_asyncapi(output: Path = typer.Option(None, help="write to this file instead of stdout")) -> None:
    """The AsyncAPI document of every integration event."""
    _load_contracts()
    from kabinet_contracts.asyncapi import asyncapi_document
    from kabinet_contracts.registry import REGISTRY

    text = json.dumps(asyncapi_document(REGISTRY), indent=2)
    if output:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")
    else:
        print(text)


@app.command("dev-token")
def dev_token(
    subject: str = typer.Argument(help="a customer id, or the name of the service the token stands for"),
    role: list[str] = typer.Option([], "--role", help="a role to grant, e.g. ledger:post (repeat for more)"),
    ttl_s: int = typer.Option(3600, min=1, max=ACCESS_TOKEN_LIFETIME_MAX_S, help="seconds the token is valid"),
) -> None:
    """An access token signed with the DEVELOPMENT key of the data dir (what `make run` trusts),
    to call a service's API by hand: `curl -H "Authorization: Bearer $(kabinet dev-token payments --role
    ledger:post)" …`. Production services trust identity's key, never this one."""
    from kabinet_chassis.auth import dev_signing_key, issue_access_token
    from kabinet_chassis.settings import StackSettings

    print(issue_access_token(dev_signing_key(StackSettings().data_dir), subject, tuple(role), ttl_s=ttl_s))


def _load_contracts() -> None:
    import importlib
    import pkgutil

    import kabinet_contracts

    for module in pkgutil.iter_modules(kabinet_contracts.__path__):
        importlib.import_module(f"kabinet_contracts.{module.name}")


def _add_plugins() -> None:
    for entry in entry_points(group="kabinet.cli"):
        app.add_typer(entry.load(), name=entry.name)


def main() -> None:
    _add_plugins()
    app()
