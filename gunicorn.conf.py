"""The checkout's gunicorn settings, read from the current folder: those of
dm_channels/gunicorn_conf.py, which an installed package names with -c python:dm_channels.gunicorn_conf."""

from dm_channels.gunicorn_conf import *  # noqa: F401,F403
