"""marshmallow schemas: what a request may say and what a response says; channel_json needs no Flask."""

import base64
import functools
import re
import uuid

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate
from marshmallow.experimental.context import Context

from dm_channels.store import NIL_UUID, UUID_FORM

UUID_DOC = {"type": "string", "format": "uuid"}


class CanonicalUUID(fields.String):
    """A UUID in the 8-4-4-4-12 hex form alone (fields.UUID takes more), loaded in lower case."""

    default_error_messages = {"invalid_uuid": "Not a UUID: expected 36 characters in the hyphenated "
                              "8-4-4-4-12 hex form (e.g. 3c90c3cc-0d44-4b50-8888-8dd25736052a)."}

    def __init__(self, description=None, **kwargs):
        doc = {**UUID_DOC, "pattern": f"^{UUID_FORM.pattern}$"}
        super().__init__(metadata={**doc, "description": description} if description else doc, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if not UUID_FORM.fullmatch(value):
            raise self.make_error("invalid_uuid")
        return value.lower()


class QuerySchema(Schema):
    """A query string, as request.args: each declared parameter at most once, others ignored."""

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def one_value_each(self, args, **kwargs):
        repeated = {}
        for name in self.load_fields:  # a loop, not a comprehension: one call fewer per request
            if (given := len(args.getlist(name))) > 1:
                repeated[name] = [f"Given {given} times; give it once."]
        if repeated:
            raise ValidationError(repeated)
        return args.to_dict()


class DMChannelQuery(QuerySchema):
    userId1 = CanonicalUUID(required=True, description="One user; required, with userId2.")
    userId2 = CanonicalUUID(required=True, description="The other; required, with userId1.")


class ElizaOSDMChannelQuery(QuerySchema):
    """The pair as the ElizaOS server spells it (and @elizaos/api-client sends it)."""

    currentUserId = CanonicalUUID(required=True, description=(
        "The ElizaOS form: with targetUserId, instead of userId1 and userId2;"
        " the answer's data is then the channel itself, an ElizaOSChannel."
    ))
    targetUserId = CanonicalUUID(required=True, description="The ElizaOS form, with currentUserId.")
    dmServerId = CanonicalUUID(description="The ElizaOS form, optional: stands for SERVER_ID.")


class PathIds(Schema):
    channelId = CanonicalUUID()
    userId = CanonicalUUID()
    serverId = CanonicalUUID()


class QueryInteger(fields.Integer):
    """Plain ASCII digits only: int() would also take ' 7', '+7' and '\u0667'."""

    default_error_messages = {"invalid": "Not a whole number."}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,9}", value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


CURSOR_FORM = re.compile(r"[A-Za-z0-9_-]{32}")  # base64url of 24 bytes


class Cursor(fields.String):
    """A listing position, (seq, channel id), as an opaque token; the store checks it is one of the listing."""

    default_error_messages = {"invalid": "Not a cursor returned by this API."}

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        seq, channel_id = value
        return base64.urlsafe_b64encode(seq.to_bytes(8, "big") + uuid.UUID(channel_id).bytes).decode()

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if not CURSOR_FORM.fullmatch(value):
            raise self.make_error("invalid")
        raw = base64.urlsafe_b64decode(value)
        seq = int.from_bytes(raw[:8], "big")
        if not 0 < seq < 1 << 63:
            raise self.make_error("invalid")
        return seq, str(uuid.UUID(bytes=raw[8:]))


class PageQuery(QuerySchema):
    limit = QueryInteger(load_default=50, validate=validate.Range(1, 200))
    cursor = Cursor(metadata={"description": "nextCursor from the previous page; omit for the first.",
                              "pattern": f"^{CURSOR_FORM.pattern}$"})


# Responses: a function field carries its OpenAPI type in metadata.
DATE_TIME_DOC = {"type": "string", "format": "date-time"}
PAIR_DOC = {"type": "object", "properties": {"user1": UUID_DOC, "user2": UUID_DOC}, "required": ["user1", "user2"],
            "description": "The two users, canonical and sorted: user1 <= user2."}
NAME_DOC = {"example": "DM-<low id>-<high id>"}
NEXT_CURSOR_DOC = {"description": "Pass as cursor for the next page; null on the last page."}


def _created_at(channel):
    return channel.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pair(channel):
    return {"user1": channel.user_low, "user2": channel.user_high}


def _server_id(channel):
    return Context.get({}).get("server_id", NIL_UUID)  # the app's SERVER_ID, given to dump()


class ChannelSchema(Schema):
    id = fields.String(required=True, metadata=UUID_DOC)
    name = fields.String(required=True, metadata=NAME_DOC)
    serverId = fields.Function(_server_id, required=True, metadata=UUID_DOC)
    type = fields.Constant("dm", required=True, metadata={"type": "string", "enum": ["text", "voice", "dm", "group"]})
    description = fields.Constant("", required=True, metadata={"type": "string"})
    metadata = fields.Function(_pair, required=True, metadata=PAIR_DOC)
    createdAt = fields.Function(_created_at, required=True, metadata=DATE_TIME_DOC)


class ElizaOSChannelSchema(Schema):
    """A channel as the ElizaOS server answers it (@elizaos/api-client's MessageChannel)."""

    id = fields.String(required=True, metadata=UUID_DOC)
    messageServerId = fields.Function(_server_id, required=True, metadata=UUID_DOC)
    name = fields.String(required=True, metadata=NAME_DOC)
    type = fields.Constant("DM", required=True, metadata={"type": "string", "enum": ["DM"]})
    metadata = fields.Function(_pair, required=True, metadata=PAIR_DOC)
    createdAt = fields.Function(_created_at, required=True, metadata=DATE_TIME_DOC)
    updatedAt = fields.Function(_created_at, required=True,
                                metadata={**DATE_TIME_DOC, "description": "createdAt: a channel never changes."})


class ChannelData(Schema):
    channel = fields.Nested(ChannelSchema, required=True)


class DMChannelData(ChannelData):
    created = fields.Boolean(required=True, metadata={"description": "True only for the request that created it."})


class ParticipantsData(Schema):
    participants = fields.List(fields.String(metadata=UUID_DOC), required=True, metadata={"minItems": 2, "maxItems": 2})


class UserChannelsData(Schema):
    channels = fields.List(fields.Nested(ChannelSchema), required=True)
    nextCursor = Cursor(required=True, allow_none=True, metadata=NEXT_CURSOR_DOC)


class ServerChannelsData(Schema):
    channels = fields.List(fields.Nested(ElizaOSChannelSchema), required=True)
    nextCursor = Cursor(required=True, allow_none=True, metadata=NEXT_CURSOR_DOC)


class HealthData(Schema):
    status = fields.Constant("ok", required=True, metadata={"type": "string", "enum": ["ok"]})


class ErrorDetail(Schema):
    code = fields.String(required=True, metadata={"description": "Stable error code"})
    message = fields.String(required=True, metadata={"description": "Error message"})
    details = fields.String(metadata={"description": "Detailed error information"})


class ErrorResponse(Schema):
    success = fields.Constant(False, required=True, metadata={"type": "boolean", "enum": [False]})
    error = fields.Nested(ErrorDetail, required=True)


@functools.cache
def success(data_schema):
    """The success envelope around a data schema, for OpenAPI: DMChannelData -> DMChannelSuccess."""
    ok = fields.Constant(True, required=True, metadata={"type": "boolean", "enum": [True]})
    envelope = {"success": ok, "data": fields.Nested(data_schema, required=True)}
    return Schema.from_dict(envelope, name=data_schema.__name__.removesuffix("Data").removesuffix("Schema") + "Success")


channel_schema = ChannelSchema()


def channel_json(channel, server_id=NIL_UUID):
    """The API's JSON object of a store's Channel (a dict), without Flask."""
    with Context({"server_id": server_id}):
        return channel_schema.dump(channel)


def describe_errors(messages):
    """marshmallow's error dict as sentences: 'userId1: Missing data for required field. ...'."""
    parts = []
    for name, problems in sorted(messages.items()):
        sentences = (p if p.endswith((".", "?")) else p + "." for p in problems)
        parts.append(f"{name}: {' '.join(sentences)}")
    return " ".join(parts)
