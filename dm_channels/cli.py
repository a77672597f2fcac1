"""The service's flask commands: init-db, backup and import-sqlite.

init_app adds them to the app's `flask` command (flask --app app init-db).
"""

from itertools import islice

import click
from flask.cli import with_appcontext

from dm_channels.api import get_store
from dm_channels.store import Store, StoreError, open_existing


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Create the channel table (and its indexes) if it does not exist."""
    store = get_store()
    store.init_schema()
    click.echo(f"Initialized {store.path} (schema version {store.schema_version()}).")


@click.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False))
@with_appcontext
def backup_command(dest):
    """Copy the live database to DEST, a new file, while the service runs."""
    store = get_store()
    try:
        store.backup(dest)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Backed up {store.path} to {dest}.")


@click.command("import-sqlite")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@with_appcontext
def import_sqlite_command(source):
    """Copy every channel of the SQLite file SOURCE into the configured store.

    Ids and createdAt are kept; a pair that already has a channel keeps its
    own, so running it again adds nothing.
    """
    store, copied, added = get_store(), 0, 0
    try:
        open_existing(source).close()  # not a misspelt path or another file
        origin = Store(source)
        try:
            channels = origin.channels()
            while batch := list(islice(channels, 10_000)):
                added += store.add_channels(batch)  # each batch its own transaction
                copied += len(batch)
        finally:
            origin.close()
    except StoreError as e:
        raise click.ClickException(f"{e} (after {added} channels added)") from e
    click.echo(f"Read {copied} channels from {source}; added {added} to {store.path}.")


COMMANDS = [init_db_command, backup_command, import_sqlite_command]
