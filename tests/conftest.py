"""The tests' fixtures; what they share otherwise is in helpers.py."""

import signal
from urllib.parse import urlsplit

import pytest
from hypothesis import settings

# Tests leave nothing in the repository: no example database in .hypothesis/.
settings.register_profile("dm-channels", database=None)
settings.load_profile("dm-channels")

from helpers import (  # noqa: E402
    POSTGRES_ROUTES,
    POSTGRES_SERVER,
    PGBOUNCER_POOL_SIZES,
    Gunicorn,
    Nginx,
    PgBouncer,
    create_postgres_database,
    drop_postgres_database,
    postgres,
    query,
    require_pgbouncer,
    route_to,
    unavailable,
)

from dm_channels.app import create_app


@pytest.fixture
def db_path(tmp_path):
    """A SQLite file: for tests of SQLite itself (PRAGMAs, its write lock)."""
    return str(tmp_path / "dm.sqlite3")


# The routes a test taking `database` runs on: an environment axis runs on the
# tests whose outcome it can change, not on every test.
#   default: SQLite and PostgreSQL directly, the two stores;
#   @pytest.mark.pgbouncer: through PgBouncer as well, in transaction and in
#     session pooling: a test of a store code path a pooler can change (its
#     statements, prepared ones beyond psycopg's threshold, the schema, errors,
#     connections shared by threads);
#   @pytest.mark.sqlite_only: no store can change the outcome (input
#     validation, routing, error envelopes, documents).
# A module that defines its own `database` fixture keeps that fixture's params.
DATABASE_ROUTES = ["sqlite", "postgresql"]
ALL_DATABASE_ROUTES = ["sqlite", *POSTGRES_ROUTES]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    if "database" not in metafunc.fixturenames or "database" in vars(metafunc.module):
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if "database" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return  # the test chose its routes itself
    if metafunc.definition.get_closest_marker("sqlite_only"):
        routes = ["sqlite"]
    elif metafunc.definition.get_closest_marker("pgbouncer"):
        routes = ALL_DATABASE_ROUTES
    else:
        routes = DATABASE_ROUTES
    # A parametrize mark, as if the test carried it: it takes the place of the
    # fixture's params, and keeps their ids (test_x[sqlite], test_x[postgresql]).
    metafunc.definition.add_marker(pytest.mark.parametrize("database", routes, indirect=True), append=False)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The benchmark's smoke run last: it loads every core for some 40 s, so
    under xdist it runs at the end of its worker's "timing" group, when the
    other worker is done with the checkout and pip tests it would slow most.

    And the tests of one xdist_group on one worker: pytest-xdist's --dist
    loadgroup suffixes their node ids with "@group" through item._nodeid
    (xdist/remote.py), which this pytest no longer reads (it keeps item._id):
    without this, a group's tests are spread over the workers."""
    items.sort(key=lambda item: item.path.name == "test_bench.py")
    if not getattr(config.option, "loadgroup", False) or not items or not hasattr(items[0], "_id"):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def pytest_xdist_auto_num_workers(config):
    """-n auto (pyproject.toml) is a worker a core, unless the output is
    wanted as it comes (-s, as the docs' commands to watch a test's figures
    use): xdist's workers would swallow it, so the tests run in this process."""
    if config.option.capture == "no":
        return 0
    return None  # xdist's own count


@pytest.fixture(params=ALL_DATABASE_ROUTES)
def database(request, tmp_path):
    """DATABASE for a test that must hold on both stores: a new SQLite file,
    or a PostgreSQL database with no tables yet (directly or through PgBouncer:
    the routes are chosen per test above)."""
    if request.param == "sqlite":
        return str(tmp_path / "dm.sqlite3")
    url = request.getfixturevalue("shared_postgres_database")
    query(url, "DROP TABLE IF EXISTS dm_channel, dm_schema")
    return route_to(request, request.param, url)


@pytest.fixture
def store_settings():
    """Keyword arguments for the stores a test makes itself (open_store,
    PostgresStore) that its DATABASE needs: the database fixtures fill it."""
    return {}


@pytest.fixture
def make_app(database):
    """make_app(**settings): create_app on the test's DATABASE; every store
    it made is closed at the end."""
    apps = []

    def make(**settings):
        apps.append(create_app({"TESTING": True, "DATABASE": database, **settings}))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["dm_channels"].store.close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def gunicorn(tmp_path):
    """Start gunicorn servers: gunicorn(db_path, workers=4, env={...}).

    Every server still running at the end of the test is killed.
    """
    servers = []

    def start(database, workers=4, env=None, extra_args=(), wait=True):
        server = Gunicorn(
            # Its temporary files (such as the metrics' directory) in the
            # test's folder: a server killed at the end leaves none elsewhere.
            {"FLASK_DATABASE": str(database), "TMPDIR": str(tmp_path), **(env or {})},
            workers,
            tmp_path / f"gunicorn-{len(servers)}.log",
            extra_args,
        )
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def postgres_server():
    """The server's URL if it answers. If not, PostgreSQL tests are skipped,
    or fail when DM_CHANNELS_REQUIRE_POSTGRES=1 (as in CI)."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed: pip install -r requirements-postgres.txt")
    try:
        postgres().close()
    except psycopg.Error as e:
        where = urlsplit(POSTGRES_SERVER).netloc.rpartition("@")[2]
        unavailable(f"PostgreSQL not reachable at {where}: {e}".strip())
    return POSTGRES_SERVER


@pytest.fixture(scope="session")
def shared_postgres_database(postgres_server):
    """One database for the session; the `database` fixture empties it per test."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def new_postgres_database(request, postgres_server):
    """new_postgres_database(route="postgresql"): a new, empty PostgreSQL
    database for this test alone, dropped at its end: its URL by that route."""
    made = []

    def make(route="postgresql"):
        made.append(create_postgres_database())
        return route_to(request, route, made[-1])

    yield make
    for url in made:
        drop_postgres_database(url)


@pytest.fixture(params=POSTGRES_ROUTES)
def postgres_database(request, new_postgres_database):
    """A new, empty PostgreSQL database for this test alone: its URL, directly
    or through PgBouncer (a test runs once by each route)."""
    return new_postgres_database(request.param)


@pytest.fixture(scope="session")
def pgbouncers(postgres_server, tmp_path_factory):
    """pgbouncers(mode): this run's PgBouncer pooling in `mode` ("transaction"
    or "session"), started on first use."""
    require_pgbouncer()
    started = {}

    def get(mode):
        if mode not in started:
            folder = tmp_path_factory.mktemp(f"pgbouncer-{mode}")
            started[mode] = PgBouncer(folder, mode, PGBOUNCER_POOL_SIZES[mode])
        return started[mode]

    yield get
    for pgbouncer in started.values():
        pgbouncer.stop()


@pytest.fixture
def new_pgbouncer(postgres_server, tmp_path):
    """new_pgbouncer(mode): a PgBouncer of this test's own (one it may stop
    and start), stopped at the end."""
    require_pgbouncer()
    started = []

    def start(mode):
        folder = tmp_path / f"pgbouncer-{len(started)}"
        folder.mkdir()
        started.append(PgBouncer(folder, mode, PGBOUNCER_POOL_SIZES[mode]))
        return started[-1]

    yield start
    for pgbouncer in started:
        pgbouncer.stop(signal.SIGKILL)


@pytest.fixture
def nginx(tmp_path):
    """Start nginx servers: nginx(upstream_port, changes=(), files=None). All
    are stopped at the end of the test."""
    servers = []

    def start(upstream_port, changes=(), files=None):
        servers.append(Nginx(upstream_port, tmp_path / f"nginx-{len(servers)}", changes, files))
        return servers[-1].wait_ready()

    yield start
    for server in servers:
        server.stop()
