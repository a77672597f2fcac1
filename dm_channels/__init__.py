"""dm-channels: which direct-message channel do two users share?"""

__version__ = "1.0.0"  # pyproject.toml and /openapi.json read it here
