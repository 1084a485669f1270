"""`kabinet ledger …` commands (registered through the `kabinet.cli` entry point)."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console
from rich.table import Table

from kabinet_chassis.databases import DATABASE_DOWN_ERRORS
from kabinet_chassis.devstack.stack import DevStack
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.settings import ServiceSettings

app = typer.Typer(help="The ledger: double-entry accounts, transfers and holds.", no_args_is_help=True)
console = Console()


def ledger_settings() -> ServiceSettings:
    stack = DevStack()
    database_url = stack.settings.database_url or stack.postgres.url
    return ServiceSettings(service_name="ledger", database_url=database_url,
                           kafka_bootstrap_servers=stack.settings.kafka_bootstrap_servers or "unused:9092")


@app.command()
def verify() -> None:
    """Trial balance, balances against legs, projections against the event store."""
    from ledger.application import LedgerApplication
    from ledger.verify import verify as run_verify

    settings = ledger_settings()
    try:
        ledger_app = LedgerApplication(env=event_store_env(settings))
        try:
            with console.status("reading the event store…"):
                report = asyncio.run(run_verify(ledger_app, settings.service_database_url))
        finally:
            ledger_app.close()
    except DATABASE_DOWN_ERRORS as error:
        # Not a verdict on the books (exit 1 means a check failed): the books were not read.
        Console(stderr=True).print(
            f"[red]error:[/red] cannot reach the ledger's database ({type(error).__name__}); is the bank"
            " (`make run`) or its stack (`kabinet stack up`) running, or KABINET_DATABASE_URL set?", soft_wrap=True)
        raise typer.Exit(2) from None
    table = Table(title=f"ledger verify — {report.events_read} events")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAILED[/red]", check.detail)
    console.print(table)
    raise typer.Exit(0 if report.ok else 1)
