"""dm-channels: which direct-message channel do these two users share?

The repository's root is this package (pyproject.toml installs it as
dm_channels): app (the Flask service), schemas, store (SQLite) and pgstore
(PostgreSQL).
"""

# The one place the version is written: the package metadata (pyproject.toml)
# and /openapi.json read it from here.
__version__ = "1.0.0"
