"""The "Try it locally" recipes of docs/deployment.md (nginx in front) and
docs/postgresql.md (PgBouncer) are run verbatim, as root and as a plain user,
so they cannot rot.

Each recipe's sh block goes to sh from the repository's root, and its output
must be its `#> ` lines, as in the README's tour. As a plain user it runs as
nobody when the tests run as root, from a copy of the checkout of nobody's
own; when they do not, as the tests' user, and the root run is skipped.
Whatever a recipe leaves running is stopped by its pid file. Without nginx,
envsubst, PgBouncer or PostgreSQL these tests are skipped, or fail when
DM_CHANNELS_REQUIRE_NGINX or DM_CHANNELS_REQUIRE_POSTGRES is 1 (as in CI).
"""

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from helpers import POSTGRES_SERVER, ROOT, copy_checkout, program, require_pgbouncer, unavailable
from test_readme import expected_pattern

# On one xdist worker: the plain user's checkout (a fixture of the module) is made once.
pytestmark = pytest.mark.xdist_group("recipes")


def recipe(doc, heading):
    """The sh block under `heading` in docs/<doc>."""
    section = (ROOT / "docs" / doc).read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(r"^```sh\n(.*?)^```", section, flags=re.M | re.S).group(1)


def expected_output(block):
    return [line[3:] for line in block.splitlines() if line.startswith("#> ")]


def need_curl():
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")


def running(folder):
    """The live processes of the pid files under folder (nginx.pid, pgbouncer.pid, ...)."""
    pids = []
    for path in folder.rglob("*.pid"):
        try:
            pid = int(path.read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # gone, or the file half written
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and path.stem.encode() in cmdline:
            pids.append(pid)
    return pids


def gone(folder, timeout):
    deadline = time.monotonic() + timeout
    while running(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(folder)


def link_or_copy(source, dest):
    try:
        os.link(source, dest)
    except OSError:  # on another file system
        shutil.copy2(source, dest)


def plain_venv(dest):
    """A venv at dest with the tests' packages that nobody can run: the tests'
    Python may lie where only root reaches (pyenv under /root), so it is made
    from the system's Python of the same version, its packages linked (or
    copied) from the tests' venv."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = shutil.which(version, path="/usr/local/bin:/usr/bin")
    if python is None:
        unavailable(f"no {version} outside root's reach to make nobody's venv with",
                    required_by="DM_CHANNELS_REQUIRE_NGINX")
    subprocess.run([python, "-m", "venv", "--without-pip", dest], check=True)
    site = Path("lib", version, "site-packages")
    shutil.copytree(Path(sys.prefix, site), dest / site, symlinks=True, dirs_exist_ok=True,
                    copy_function=link_or_copy)
    for script in ("flask", "gunicorn"):
        code = Path(sys.prefix, "bin", script).read_text().split("\n", 1)[1]
        (dest / "bin" / script).write_text(f"#!{dest / 'bin' / 'python'}\n{code}")
        (dest / "bin" / script).chmod(0o755)


@pytest.fixture(scope="module")
def nobodys_checkout():
    """A copy of the checkout, with a venv, owned by nobody, as a plain user's
    clone is; not under pytest's tmp_path, which only root may enter."""
    folder = Path(tempfile.mkdtemp(prefix="dm-recipe-checkout-"))
    folder.chmod(0o755)
    checkout = copy_checkout(folder / "dm-channels")
    nobody = pwd.getpwnam("nobody")
    for path in [checkout, *checkout.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    plain_venv(checkout / ".venv")  # root's, as its files are linked: nobody needs only to read it
    yield checkout
    shutil.rmtree(folder)


@pytest.fixture(params=["root", "plain user"])
def run(request):
    """run(block, **env): run the recipe `block` as written, as root or as a
    plain user (nobody when the tests run as root), with a fresh folder as
    TMPDIR (for its mktemp -d) that has /tmp's mode; check its output, and
    that it stopped what it started. Whatever is left is stopped in any case."""
    as_root = os.geteuid() == 0
    if request.param == "root" and not as_root:
        pytest.skip("the tests do not run as root")
    checkout, user = ROOT, {}
    if request.param == "plain user" and as_root:
        checkout = request.getfixturevalue("nobodys_checkout")
        nobody = pwd.getpwnam("nobody")
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    folder = Path(tempfile.mkdtemp(prefix="dm-recipe-"))
    folder.chmod(0o1777)

    def run(block, **env):
        env = {"PATH": os.environ["PATH"], "HOME": str(folder), "TMPDIR": str(folder),
               "LANG": "C.UTF-8", **env}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # Files, not pipes: a daemon that kept one open would hold run() until it exits.
            done = subprocess.run(
                ["sh", "-c", block], cwd=checkout, env=env, stdout=out, stderr=err, timeout=120,
                **user,
            )
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        assert done.returncode == 0, f"{stdout}\n{stderr}"
        assert re.fullmatch(expected_pattern(expected_output(block)), stdout, flags=re.S), (
            f"expected: {expected_output(block)}\ngot: {stdout}\n{stderr}"
        )
        assert gone(folder, timeout=30), f"still running after the recipe: {running(folder)}"

    yield run
    for pid in running(folder):
        os.kill(pid, signal.SIGTERM)
    if not gone(folder, timeout=10):
        for pid in running(folder):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def test_the_nginx_recipe_runs_as_written(run):
    """docs/deployment.md: gunicorn and nginx started unprivileged on free
    ports, the template rendered for nginx, asked through and both stopped."""
    program("nginx")
    program("envsubst")
    need_curl()
    run(recipe("deployment.md", "### Try it locally"))


def test_the_pgbouncer_recipe_runs_as_written(run, new_postgres_database):
    """docs/postgresql.md: PgBouncer in transaction mode with an ini of its
    own (as nobody when run as root), the schema made and a channel created
    through it, then both stopped. PG, the recipe's variable, names the test's
    own database."""
    require_pgbouncer()
    need_curl()
    server = urlsplit(POSTGRES_SERVER)
    if (server.username, server.password) != ("postgres", None):
        unavailable("the recipe logs in as postgres without a password, unlike DM_CHANNELS_TEST_POSTGRES")
    database = urlsplit(new_postgres_database()).path[1:]
    run(recipe("postgresql.md", "#### Try it locally"),
        PG=f"host={server.hostname} port={server.port or 5432} dbname={database}")
