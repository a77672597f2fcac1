"""The service's flask commands: init-db, backup and import-sqlite (flask --app app init-db)."""

import functools
from itertools import islice

import click
from flask import current_app
from flask.cli import with_appcontext

from dm_channels.store import Store, StoreError, open_existing


def get_store():
    return current_app.extensions["dm_channels"].store

# Pairs whose channel differs between the two stores, shown by import-sqlite.
SHOWN_DIFFERENT = 5


def store_command(name):
    """A command `name`, run in the app's context; a StoreError is its one Error: line."""

    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except StoreError as e:
                raise click.ClickException(str(e)) from e

        return click.command(name)(with_appcontext(run))

    return decorate


@store_command("init-db")
def init_db_command():
    """Create the database's tables and indexes, if they do not exist."""
    store = get_store()
    store.init_schema()
    click.echo(f"Initialized {store.path} (schema version {store.schema_version()}).")


@store_command("backup")
@click.argument("dest", type=click.Path(dir_okay=False))
def backup_command(dest):
    """Copy the live database to DEST, a new file, while the service runs."""
    store = get_store()
    store.backup(dest)
    click.echo(f"Backed up {store.path} to {dest}.")


@store_command("import-sqlite")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--keep-different", is_flag=True, allow_from_autoenv=False,  # said on the command line alone
    help="Exit 0 even if some channels of SOURCE differ from this store's.",
)
def import_sqlite_command(source, keep_different):
    """Copy every channel of the SQLite file SOURCE into the configured store.

    Ids and createdAt are kept; a pair that already has a channel keeps its
    own, so running it again adds nothing. A pair whose channel here has
    another id than in SOURCE is reported, and the command exits 1 unless
    given --keep-different.
    """
    store, copied, added, different, shown = get_store(), 0, 0, 0, []
    try:
        open_existing(source).close()  # not a misspelt path or another file
        origin = Store(source)
        try:
            channels = origin.channels()
            while batch := list(islice(channels, 10_000)):
                batch_added = store.add_channels(batch)  # each batch its own transaction
                if batch_added < len(batch):  # some pairs had a channel here already
                    lines = differing(store, batch)
                    different += len(lines)
                    shown += lines[:SHOWN_DIFFERENT - len(shown)]
                added += batch_added
                copied += len(batch)
        finally:
            origin.close()
    except StoreError as e:
        raise click.ClickException(f"{e} (after {added} channels added)") from e
    click.echo(f"Read {copied} channel{plural(copied)} from {source}; added {added} to {store.path}.")
    if different:
        click.echo(f"{different} channels of SOURCE differ from {store.path}, which keeps its own:", err=True)
        for line in shown:
            click.echo(f"  {line}", err=True)
        if different > len(shown):
            click.echo(f"  ... and {different - len(shown)} more", err=True)
        if not keep_different:
            raise click.ClickException(
                "clients holding the ids of SOURCE will not find those channels;"
                " --keep-different accepts that"
            )


def plural(n):
    return "" if n == 1 else "s"


def differing(store, channels):
    """A line for each of `channels` that `store` does not hold as it is."""
    held = store.find_pairs((channel.user_low, channel.user_high) for channel in channels)
    lines = []
    for channel in channels:
        there = held.get((channel.user_low, channel.user_high))
        if there is None or there.id != channel.id:
            theirs = "none here (that id is another pair's)" if there is None else f"{there.id} here"
            lines.append(f"{channel.user_low} {channel.user_high}: {channel.id} in SOURCE, {theirs}")
    return lines


COMMANDS = [init_db_command, backup_command, import_sqlite_command]
