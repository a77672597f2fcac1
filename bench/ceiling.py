"""The ceiling the service is measured against: a bare Flask app answering the
service's route with a constant body of the same shape and size as a warm
get's, with no validation and no store. Served by bench/run.py under the same
gunicorn settings as the service: gunicorn "bench.ceiling:app".
"""

from flask import Flask

USER1 = "0b1e2c4d-9f1a-4c2e-8d7b-1a2b3c4d5e6f"
USER2 = "3c90c3cc-0d44-4b50-8888-8dd25736052a"

BODY = {
    "success": True,
    "data": {
        "channel": {
            "id": "5d0e8f52-6f0c-4c0d-9a55-2a8f2f1f6b3e",
            "name": f"DM-{USER1}-{USER2}",
            "serverId": "00000000-0000-0000-0000-000000000000",
            "type": "dm",
            "description": "",
            "metadata": {"user1": USER1, "user2": USER2},
            "createdAt": "2026-11-25T23:24:37.191Z",
        },
        "created": False,
    },
}

app = Flask(__name__)
app.json.sort_keys = False  # as the service


@app.get("/api/messaging/dm-channel")
def dm_channel():
    # Returned as a dict, like the service's view: Flask serialises it the same way.
    return BODY
