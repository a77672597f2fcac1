"""dm-channels: which direct-message channel do these two users share?

app (the Flask service), api, schemas, settings, channels (what both stores
share), store (SQLite, with writers) and pgstore (PostgreSQL), ops, logs, cli;
the repository's root app.py is the service's entry point.
"""

# The one place the version is written: the package metadata (pyproject.toml)
# and /openapi.json read it from here.
__version__ = "1.0.0"
