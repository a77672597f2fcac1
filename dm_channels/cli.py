"""The service's flask commands: init-db, backup and import-sqlite (flask --app app init-db)."""

from contextlib import closing
from itertools import islice

import click
from flask import current_app
from flask.cli import with_appcontext

from dm_channels.store import Store, StoreError, open_existing


class StoreCommand(click.Command):
    """A command whose StoreError is its one Error: line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StoreError as e:
            raise click.ClickException(str(e)) from e


@click.command("init-db", cls=StoreCommand)
@with_appcontext
def init_db_command():
    """Create the database's tables and indexes, if they do not exist."""
    store = current_app.extensions["dm_channels"].store
    store.init_schema()
    click.echo(f"Initialized {store.path} (schema version {store.schema_version()}).")


@click.command("backup", cls=StoreCommand)
@click.argument("dest", type=click.Path(dir_okay=False))
@with_appcontext
def backup_command(dest):
    """Copy the live database to DEST, a new file, while the service runs."""
    store = current_app.extensions["dm_channels"].store
    store.backup(dest)
    click.echo(f"Backed up {store.path} to {dest}.")


@click.command("import-sqlite", cls=StoreCommand)
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--keep-different", is_flag=True, allow_from_autoenv=False,  # said on the command line alone
              help="Exit 0 even if some channels of SOURCE differ from this store's.")
@with_appcontext
def import_sqlite_command(source, keep_different):
    """Copy every channel of the SQLite file SOURCE, ids and createdAt kept, into the configured store.

    A pair with a channel here keeps its own; one of another id than in SOURCE is reported, and
    the command exits 1 unless given --keep-different."""
    store, copied, added, different, shown = current_app.extensions["dm_channels"].store, 0, 0, 0, []
    try:
        open_existing(source).close()  # not a misspelt path or another file
        with closing(Source(source)) as origin:
            channels = origin.channels()
            while batch := list(islice(channels, 10_000)):
                batch_added = store.add_channels(batch)  # each batch its own transaction
                if batch_added < len(batch):  # some pairs had a channel here already
                    lines = list(differing(store, batch))
                    different, shown = different + len(lines), (shown + lines)[:5]
                added += batch_added
                copied += len(batch)
    except StoreError as e:
        raise click.ClickException(f"{e} (after {counted(added)} added)") from e
    click.echo(f"Read {counted(copied)} from {source}; added {added} to {store.path}.")
    if different:
        verb = "differs" if different == 1 else "differ"
        more = [f"... and {different - len(shown)} more"] if different > len(shown) else []
        click.echo(f"{counted(different)} of SOURCE {verb} from {store.path}, which keeps its own:", err=True)
        click.echo("".join(f"  {line}\n" for line in shown + more), err=True, nl=False)
        if not keep_different:
            raise click.ClickException("clients holding the ids of SOURCE will not find those channels;"
                                       " --keep-different accepts that")


class Source(Store):
    """An import's source: the operator's own file, whose owner the service does not check."""

    def _refuse_foreign(self):
        pass


def counted(n):
    return f"{n} channel{'' if n == 1 else 's'}"


def differing(store, channels):
    """Lines for those of `channels` that `store` does not hold as they are."""
    for channel in channels:
        there = store.find_dm(channel.user_low, channel.user_high)
        if there is None or there.id != channel.id:
            theirs = "none here (that id is another pair's)" if there is None else f"{there.id} here"
            yield f"{channel.user_low} {channel.user_high}: {channel.id} in SOURCE, {theirs}"


COMMANDS = [init_db_command, backup_command, import_sqlite_command]
