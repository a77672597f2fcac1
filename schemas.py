"""marshmallow schemas: what a request may say, and what a response says.

Built once at module level and reused by every request.
"""

import re

from flask import current_app
from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load

# The one spelling we accept: 36 characters, 8-4-4-4-12 hex, any case, any
# version nibble. fields.UUID would also take braces, urn:uuid: and 32 bare
# hex digits, which this API promises to refuse.
UUID_FORM = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


class CanonicalUUID(fields.String):
    """A UUID in 8-4-4-4-12 hex form, loaded as its lower-case canonical form."""

    default_error_messages = {
        "invalid_uuid": "Not a UUID: expected 36 characters in the hyphenated "
        "8-4-4-4-12 hex form (e.g. 3c90c3cc-0d44-4b50-8888-8dd25736052a)."
    }

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if not UUID_FORM.fullmatch(value):
            raise self.make_error("invalid_uuid")
        return value.lower()


class QuerySchema(Schema):
    """A query string, given as a dict of lists (`request.args.to_dict(flat=False)`).

    Each declared parameter must appear once; unknown parameters are ignored.
    """

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def one_value_each(self, data, **kwargs):
        repeated = {
            name: [f"Given {len(data[name])} times; give it once."]
            for name in self.load_fields
            if isinstance(data.get(name), list) and len(data[name]) > 1
        }
        if repeated:
            raise ValidationError(repeated)
        return {
            name: values[0] if isinstance(values, list) else values
            for name, values in data.items()
        }


class DMChannelQuery(QuerySchema):
    userId1 = CanonicalUUID(required=True)
    userId2 = CanonicalUUID(required=True)


def _created_at(channel):
    return channel.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ChannelSchema(Schema):
    id = fields.String()
    name = fields.String()
    serverId = fields.Function(lambda channel: current_app.config["SERVER_ID"])
    type = fields.Constant("dm")
    description = fields.Constant("")
    metadata = fields.Function(
        lambda channel: {"user1": channel.user_low, "user2": channel.user_high}
    )
    createdAt = fields.Function(_created_at)


class DMChannelData(Schema):
    channel = fields.Nested(ChannelSchema)
    created = fields.Boolean()


class DMChannelResponse(Schema):
    success = fields.Constant(True)
    data = fields.Nested(DMChannelData)


class ErrorDetail(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.String()


class ErrorResponse(Schema):
    success = fields.Constant(False)
    error = fields.Nested(ErrorDetail)


dm_channel_query = DMChannelQuery()
dm_channel_response = DMChannelResponse()
error_response = ErrorResponse()


def describe_errors(messages):
    """Flatten marshmallow's error dict into one line: 'userId1: ...; userId2: ...'."""
    parts = []
    for name, problems in sorted(messages.items()):
        if isinstance(problems, dict):
            problems = [describe_errors(problems)]
        parts.append(f"{name}: {' '.join(problems)}")
    return "; ".join(parts)
