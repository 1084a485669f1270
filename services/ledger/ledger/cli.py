"""`kabinet ledger …` commands (registered through the `kabinet.cli` entry point)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import typer
from eventsourcing.persistence import ProgrammingError as EventStoreProgrammingError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kabinet_chassis import history_seals
from kabinet_chassis.databases import DATABASE_CONNECT_TIMEOUT_S, DATABASE_DOWN_ERRORS
from kabinet_chassis.devstack.stack import DevStack
from kabinet_chassis.ed25519_keys import public_pem
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.settings import ServiceSettings
from ledger.domain.stored import stored_later

app = typer.Typer(help="The ledger: double-entry accounts, transfers and holds.", no_args_is_help=True)
console = Console()
ERRORS = Console(stderr=True)  # progress and errors on stderr: stdout is the answer alone


def ledger_settings() -> ServiceSettings:
    stack = DevStack()
    database_url = stack.settings.database_url or stack.postgres.url
    return ServiceSettings(service_name="ledger", database_url=database_url,
                           kafka_bootstrap_servers=stack.settings.kafka_bootstrap_servers or "unused:9092")


# The database answered, but not as a ledger's the auditor may read: a wrong database or
# role, or one without the grants. No verdict on the books either (exit 2, not 1).
DATABASE_UNREADABLE_ERRORS = (
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InvalidAuthorizationSpecificationError,  # no such role, a wrong password
    asyncpg.InsufficientPrivilegeError,
    asyncpg.UndefinedTableError,  # not (yet) a ledger's database
    asyncpg.UndefinedColumnError,
    EventStoreProgrammingError,  # the same, met by eventsourcing's reader: a table it may not read, say
)
# On a replica, where the README has a long verify run, a read the replica's recovery
# conflicts with is cancelled with SQLSTATE 40001.
READS_CANCELLED_ERRORS = (asyncpg.SerializationError,)


def settings_or_exit() -> ServiceSettings:
    """The ledger's settings; settings that do not hold are one line on stderr and exit 2."""
    try:
        return ledger_settings()
    except ValidationError as error:  # a malformed KABINET_HISTORY_SEAL_KEY, say
        ERRORS.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _progress_bar() -> Progress:
    """How far a long pass over the history has come, on stderr (stdout stays the answer),
    gone once it ends."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=ERRORS, transient=True)


async def _log_in(settings: ServiceSettings) -> None:
    """Log in once before eventsourcing's pool does: its pool takes a login the server refused
    (a wrong password, no such database) for a server not up yet, tries again for its whole
    connect timeout, then says only OperationalError. The server's own reason, at once, is
    what an operator needs."""
    connection = await asyncpg.connect(settings.service_database_url, timeout=DATABASE_CONNECT_TIMEOUT_S)
    await connection.close()


@contextlib.contextmanager
def ledger_application() -> Iterator[tuple[ServiceSettings, Any]]:
    """The ledger's settings and event store, for a command that reads them. A database
    that cannot be reached or read, or settings that do not hold, give no answer at all:
    one line on stderr and exit 2 (exit 1 is verify's "a check failed")."""
    from ledger.application import LedgerApplication

    settings = settings_or_exit()
    try:
        asyncio.run(_log_in(settings))
        # Created nothing: an auditor's role may only read, and verify run on a database
        # that is not (yet) a ledger's must leave it as it is.
        ledger_app = LedgerApplication(env=event_store_env(settings, creates_tables=False))
        try:
            yield settings, ledger_app
        finally:
            ledger_app.close()
    except BrokenPipeError:  # stdout's reader left (`… | head`), not the database: click ends it quietly
        raise
    except DATABASE_DOWN_ERRORS as error:
        ERRORS.print(
            f"[red]error:[/red] cannot reach the ledger's database ({type(error).__name__}); is the bank"
            " (`make run`) or its stack (`kabinet stack up`) running, or KABINET_DATABASE_URL set?", soft_wrap=True)
        raise typer.Exit(2) from None
    except DATABASE_UNREADABLE_ERRORS as error:
        ERRORS.print(f"[red]error:[/red] cannot read the ledger's database ({type(error).__name__}:"
                     f" {escape(str(error))}); is KABINET_DATABASE_URL the ledger's, and may its role read every"
                     " table?", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except READS_CANCELLED_ERRORS as error:
        ERRORS.print(f"[red]error:[/red] the database cancelled the reads ({escape(str(error))}); on a replica, its"
                     " recovery conflicted with them: run it again with hot_standby_feedback = on there, or on a"
                     " restored copy", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


@app.command()
def verify(
    as_json: bool = typer.Option(False, "--json", help="The verdict as one JSON object, for auditors' tools."),
    seal: str | None = typer.Option(
        None, "--seal", metavar="N:HEX",
        help="The last seal an earlier verify showed: fails if it is gone or changed (history cut from the end)."),
) -> None:
    """Trial balance, balances against legs, projections against the event store, the
    events against the writer's rules and their seals. Exit 0: every check passed; 1: a check failed; 2:
    the database could not be read."""
    from ledger.verify import verify as run_verify

    try:
        noted_seal = history_seals.parse_receipt(seal) if seal is not None else None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--seal") from None
    with ledger_application() as (settings, ledger_app), _progress_bar() as progress:
        reading = progress.add_task("verifying: reading the event store…", total=None)

        def read_to(stage: str, position: int, head: int) -> None:  # a long history shows how far verify is
            progress.update(reading, completed=position, total=head,
                            description=f"verifying: {stage} up to position {position:,} of {head:,}")

        report = asyncio.run(run_verify(ledger_app, settings, noted_seal, on_progress=read_to))
    if as_json:
        typer.echo(json.dumps(report.as_json()))
    else:
        table = Table(title=f"ledger verify — {report.events_read} events")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for check in report.checks:
            result = "[green]ok[/green]" if check.ok else f"[red]FAILED[/red] ({check.problems_count})"
            table.add_row(check.name, result, escape(check.detail))
        console.print(table)
    raise typer.Exit(0 if report.ok else 1)


@app.command("seal-public-key")
def seal_public_key() -> None:
    """The public key of the ledger's seal key, as PEM: what auditors check the seals with
    (KABINET_HISTORY_SEAL_PUBLIC_KEYS of their own verify). It cannot sign a seal."""
    typer.echo(public_pem(history_seals.seal_key_for(settings_or_exit())), nl=False)


@app.command("rebuild-read-model")
def rebuild_read_model() -> None:
    """Build the read model (accounts, entries, transfers, holds) again from every event, beside
    the live one, then put it live in one short transaction: for a read model verify finds
    differing from the event store. The ledger may keep running and posting meanwhile. Exit 0:
    rebuilt; 1: not rebuilt, nothing changed (another rebuild is running, or readers held the
    live tables throughout); 2: the database could not be read."""
    from ledger.rebuild import RebuildNotDone
    from ledger.rebuild import rebuild_read_model as rebuild

    with ledger_application() as (settings, ledger_app), _progress_bar() as progress:
        building = progress.add_task("rebuilding the read model…", total=None)

        def applied_to(position: int, head: int) -> None:  # rebuilding a long history takes a while
            progress.update(building, completed=position, total=head,
                            description=f"rebuilding the read model: events applied up to position {position:,}"
                                        f" of {head:,}")

        try:
            rebuilt = asyncio.run(rebuild(ledger_app, settings.service_database_url, on_progress=applied_to))
        except RebuildNotDone as error:
            ERRORS.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None
    console.print(f"rebuilt the read model from {rebuilt.events_applied} events in {rebuilt.took_s:.1f} s; live at"
                  f" position {rebuilt.position}", highlight=False)


EVENTS_PAGE_MAX = 10_000


@app.command()
def events(
    after: int = typer.Option(0, "--after", min=0, help="Print the events after this position (0: from the first)."),
    limit: int = typer.Option(1_000, "--limit", min=1, max=EVENTS_PAGE_MAX, help="Print at most this many events."),
) -> None:
    """The event history as it is stored, one JSON object a line, in log order: for auditors
    and analysts. Each names its position (page on with `--after` the last one printed), type,
    stream, version, time, who asked for it, and its data."""

    with ledger_application() as (_, ledger_app):
        notifications = ledger_app.recorder.select_notifications(start=after, limit=limit, inclusive_of_start=False)
        for notification in notifications:
            try:
                line = _event_line(notification.id, ledger_app.mapper.to_domain_event(notification))
            # Whatever was changed by hand (its bytes, its type, its fields), the export goes on:
            # an auditor has no position to skip to. verify names it too.
            except Exception as error:
                line = _unreadable_event_line(notification, error)
            typer.echo(json.dumps(line, default=str, ensure_ascii=False))


def _unreadable_event_line(notification, error: Exception) -> dict:
    """An event stored in a form the ledger cannot read (changed by hand, say): what is
    stored, as it is, and why it could not be read; verify names it too."""
    return {"position": notification.id, "type": notification.topic, "stream_id": str(notification.originator_id),
            "version": notification.originator_version, "unreadable": f"{type(error).__name__}: {error}",
            "stored_state_base64": base64.b64encode(bytes(notification.state)).decode()}


def _event_line(position: int, event) -> dict:
    data = {name: value for name, value in vars(event).items()
            if name not in ("originator_id", "originator_version", "timestamp", "requested_by")}
    return {"position": position, "type": type(event).__qualname__, "stream_id": str(event.originator_id),
            "version": event.originator_version, "occurred_at": event.timestamp.isoformat(),
            "requested_by": stored_later(event, "requested_by"), "data": data}
