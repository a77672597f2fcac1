"""The service's entry point: `gunicorn "app:create_app()"` and `flask --app app`
find the app here. The code is the package in dm_channels/."""

from dm_channels.app import create_app, init_app

__all__ = ["create_app", "init_app"]
