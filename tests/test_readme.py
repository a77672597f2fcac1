"""The README's tour is run as written, so it cannot rot; and every command
the README and docs/ show uses the venv's own programs."""

import os
import re
import shutil
import subprocess

import pytest

from helpers import DOCS, ROOT, shell_blocks


def tour_steps():
    """The README's tour: [(command, expected output lines)], in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A two-minute tour", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, flags=re.M | re.S).group(1)
    steps = []
    for line in block.splitlines():
        if line.startswith("#> "):
            steps[-1][1].append(line[3:])
        elif line.strip() and not line.startswith("#"):
            steps.append((line, []))
    return steps


def expected_pattern(lines):
    # "…" stands for anything of the reader's own (an id, a time, the rest of an object).
    return "".join(".*?".join(map(re.escape, line.split("…"))) + "\n" for line in lines)


def test_the_tour_answers_exactly_as_shown(gunicorn, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    server = gunicorn(tmp_path / "tour.sqlite3", workers=2)
    steps = tour_steps()
    assert len(steps) >= 10
    marker = "--- next step ---"
    script = "set -e\n" + "".join(
        command.replace("http://127.0.0.1:8000", server.url) + f"\necho '{marker}'\n"
        for command, _ in steps
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    outputs = done.stdout.split(marker + "\n")[:-1]
    assert len(outputs) == len(steps)
    for (command, expected), output in zip(steps, outputs):
        assert re.fullmatch(expected_pattern(expected), output, flags=re.S), (
            f"{command}\nexpected: {expected}\ngot: {output}"
        )


VENV_PROGRAMS = ("flask", "gunicorn", "pip", "python", "pytest")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_commands_use_the_venv_programs(path):
    """A bare `flask --app app ...` picks up whatever flask is on PATH (and
    fails without the project's dependencies): every command says .venv/bin/."""
    bare = []
    for block in shell_blocks(path):
        for line in block.splitlines():
            command = line.split("#")[0]
            for part in re.split(r"&&|\|\||;|\|", command):
                words = part.split()
                while words and "=" in words[0]:  # FLASK_DATABASE=... .venv/bin/flask
                    words = words[1:]
                if words and words[0] in VENV_PROGRAMS:
                    bare.append(line.strip())
    assert bare == []


def test_every_doc_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path in DOCS[1:]:
        assert f"(docs/{path.name})" in readme, path.name


def test_the_settings_table_lists_every_setting_once():
    from dm_channels.settings import SETTINGS

    readme = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| `([A-Z_]+)` \|", readme.split("## Settings", 1)[1], flags=re.M)
    assert sorted(table) == sorted(SETTINGS)
