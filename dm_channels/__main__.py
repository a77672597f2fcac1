"""python -m dm_channels: the version, and the commands that serve and manage the service."""

import os
import sys
from importlib import metadata

from dm_channels import __version__


def where_documented():
    """The installed package's documentation URL (pyproject.toml's); in a checkout, its README."""
    try:
        urls = metadata.metadata("dm-channels").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    for label, _, url in (entry.partition(", ") for entry in urls):
        if label == "Documentation":
            return url
    return "README.md"


def main():
    # This interpreter's programs (a venv's own, as the README writes them).
    bin = os.path.dirname(sys.executable)
    if not os.path.relpath(bin).startswith(".."):
        bin = os.path.relpath(bin)
    print(
        f"dm-channels {__version__}: which direct-message channel do these two users share?\n"
        "\n"
        f'Serve it:   {bin}/gunicorn "dm_channels.app:create_app()"\n'
        f"Manage it:  {bin}/flask --app dm_channels.app init-db | backup DEST | import-sqlite SOURCE\n"
        "\n"
        f"Settings are FLASK_* variables (FLASK_DATABASE ...): {where_documented()}"
    )


if __name__ == "__main__":
    main()
