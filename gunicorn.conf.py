"""The checkout's gunicorn settings, read from the current folder: those of dm_channels/gunicorn_conf.py."""

from dm_channels.gunicorn_conf import *  # noqa: F401,F403
