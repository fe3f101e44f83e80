"""HTTP routes for every API an engine speaks besides chat: Anthropic Messages, Responses, rerank, audio,
images and `/upstream/{model}/{path}`; each is routed by its model and relayed by router/passthrough.py.

- POST /v1/messages, /v1/messages/count_tokens (Anthropic): routed by the JSON `model`; a streamed
  wait sends `ping` events, and the status lines as a thinking block when the request asked for
  thinking (router/anthropic.py); errors in Anthropic's shape.
- POST /v1/responses (OpenAI Responses API): JSON `model`; a streamed wait sends `: loading`
  comments; a failed load ends the stream with `error` and `response.failed`.
- POST /v1/rerank, /rerank, /v1/images/generations, /v1/audio/speech: JSON `model`; silent wait.
- POST /v1/audio/transcriptions, /v1/audio/translations: the multipart form's `model` field.
- any method on /upstream/{model}/{path}: the model from the path, the rest goes to the engine.

Models are found by id or alias (`Config.resolve`); `upstream_model` renames the model for the
engine and `params` (router/params.py) shape a JSON body. A body that needs no change goes to the
engine as the client's own bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router import anthropic, multipart
from router.anthropic import AnthropicShape, strip_router_thinking, wants_thinking
from router.config import Config, Model
from router.params import apply_params, encode_json, has_params
from router.passthrough import ApiCall, PassThrough, PlainShape, ResponsesShape, WaitShape
from router.proxy import upstream_headers
from router.requestbody import BadBody, ClientLeft, check_stream, parse_body, read_body
from router.scheduler import PRIORITIES
from router.switcher import Switcher
from router.upstream import Upstream

Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[..., Handler]

UPSTREAM_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_ROUTER_SIGNATURE = anthropic.ROUTER_SIGNATURE.encode()


class _Refused(Exception):
    """A request that cannot go on; `response` says why, in the API's own error shape."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


def _bad(shape: WaitShape, status: int, message: str, code: str, param: str | None = None) -> _Refused:
    return _Refused(shape.error_response(status, message, code, param))


def _refused(shape: WaitShape, bad: BadBody) -> _Refused:
    return _Refused(shape.error_response(bad.status, bad.message, bad.code, bad.param,
                                         {"connection": "close"} if bad.close else None))


class ApiRoutes:
    """The handlers; the switching and the relay are the chat API's own (router/switcher.py, router/proxy.py)."""

    def __init__(self, switcher: Switcher, upstream: Upstream) -> None:
        self.switcher = switcher
        self.relay = PassThrough(switcher, upstream)

    def routes(self, guarded: Guard) -> list[Route]:
        """The routes, each behind the API keys (`guarded` from router/app.py)."""
        unauthorized = self.anthropic_unauthorized
        return [
            Route("/v1/messages", guarded(self.messages, unauthorized=unauthorized), methods=["POST"]),
            Route("/v1/messages/count_tokens", guarded(self.count_tokens, unauthorized=unauthorized),
                  methods=["POST"]),
            Route("/v1/responses", guarded(self.responses), methods=["POST"]),
            Route("/v1/rerank", guarded(self.json_endpoint), methods=["POST"]),
            Route("/rerank", guarded(self.json_endpoint), methods=["POST"]),
            Route("/v1/images/generations", guarded(self.json_endpoint), methods=["POST"]),
            Route("/v1/audio/speech", guarded(self.json_endpoint), methods=["POST"]),
            Route("/v1/audio/transcriptions", guarded(self.form_endpoint), methods=["POST"]),
            Route("/v1/audio/translations", guarded(self.form_endpoint), methods=["POST"]),
            Route("/upstream/{rest:path}", guarded(self.upstream), methods=UPSTREAM_METHODS),
        ]

    @staticmethod
    def anthropic_unauthorized(message: str) -> Response:
        return anthropic.error_response(401, message)

    @property
    def config(self) -> Config:
        return self.switcher.config

    # --- handlers -----------------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        """POST /v1/messages: Anthropic's Messages API, streamed or not."""
        try:
            raw, body = await self._json(request, _ANTHROPIC_ERRORS)
            name, model = self._model(body.get("model"), _ANTHROPIC_ERRORS)
            if not isinstance(body.get("messages"), list):
                raise _bad(_ANTHROPIC_ERRORS, 400, "The request has no `messages` list.", "missing_field", "messages")
            changed = _ROUTER_SIGNATURE in raw and strip_router_thinking(body["messages"])
            upstream = self._engine_body(raw, body, model, changed)
            stream = body.get("stream") is True  # as the engine gets it (params may set it)
            shape = AnthropicShape(name, thinking=stream and wants_thinking(body))
            return await self._relay(request, "/v1/messages", model, upstream, stream, shape)
        except _Refused as refused:
            return refused.response

    async def count_tokens(self, request: Request) -> Response:
        """POST /v1/messages/count_tokens: the engine counts (the model is loaded for it, like any request)."""
        try:
            raw, body = await self._json(request, _ANTHROPIC_ERRORS)
            name, model = self._model(body.get("model"), _ANTHROPIC_ERRORS)
            changed = _ROUTER_SIGNATURE in raw and strip_router_thinking(body.get("messages"))
            upstream = self._engine_body(raw, body, model, changed)
            shape = AnthropicShape(name, thinking=False)
            return await self._relay(request, "/v1/messages/count_tokens", model, upstream, False, shape)
        except _Refused as refused:
            return refused.response

    async def responses(self, request: Request) -> Response:
        """POST /v1/responses: the OpenAI Responses API, passed through to engines that implement it."""
        try:
            raw, body = await self._json(request, _PLAIN)
            name, model = self._model(body.get("model"), _PLAIN)
            upstream = self._engine_body(raw, body, model, False)
            return await self._relay(request, "/v1/responses", model, upstream, body.get("stream") is True,
                                     ResponsesShape(name))
        except _Refused as refused:
            return refused.response

    async def json_endpoint(self, request: Request) -> Response:
        """Rerank, image generation, speech: a JSON body with `model`, the answer relayed as the engine sends it."""
        try:
            raw, body = await self._json(request, _PLAIN)
            _, model = self._model(body.get("model"), _PLAIN)
            upstream = self._engine_body(raw, body, model, False)
            return await self._relay(request, request.url.path, model, upstream, body.get("stream") is True, _PLAIN)
        except _Refused as refused:
            return refused.response

    async def form_endpoint(self, request: Request) -> Response:
        """Audio transcription and translation: a multipart form routed by its `model` field; the upload is
        held once (as it came, within limits.max_body_bytes) and forwarded as the same bytes."""
        try:
            boundary = multipart.boundary_of(request.headers.get("content-type"))
            if boundary is None:
                raise _bad(_PLAIN, 400, "The request must be multipart/form-data (a file and its `model`).",
                           "invalid_content_type")
            raw = await self._read(request, _PLAIN)
            fields = multipart.find_fields(raw, boundary, ("model", "stream"))
            if fields is None:
                raise _bad(_PLAIN, 400, "The multipart body is malformed (its parts do not match the boundary "
                                        "in Content-Type).", "invalid_body")
            field = fields.get("model")
            try:
                name_value = field.value.decode("utf-8").strip() if field is not None else None
            except UnicodeDecodeError:
                raise _bad(_PLAIN, 400, "The form field `model` is not UTF-8.", "invalid_field", "model") from None
            _, model = self._model(name_value, _PLAIN)
            engine_name = _engine_name(model, name_value)
            if engine_name is not None and field is not None:
                raw = multipart.replace_field(raw, field, engine_name.encode("utf-8"))
            stream = "stream" in fields and fields["stream"].value.strip().lower() == b"true"
            return await self._relay(request, request.url.path, model, raw, stream, _PLAIN)
        except _Refused as refused:
            return refused.response

    async def upstream(self, request: Request) -> Response:
        """/upstream/{model}/{path}: the engine's own endpoints, any method; loads the model like any request."""
        try:
            raw_path = request.scope.get("raw_path") or request.url.path.encode()
            rest = raw_path.decode("latin-1").split("?", 1)[0][len("/upstream/"):]
            model, target = self._upstream_target(rest)
            query = request.scope.get("query_string", b"").decode("latin-1")
            body = await self._read(request, _PLAIN)
            target += f"?{query}" if query else ""
            return await self._relay(request, "/upstream", model, body, False, _PLAIN, target=target,
                                     method=request.method)
        except _Refused as refused:
            return refused.response

    # --- the steps ----------------------------------------------------------------------------

    async def _read(self, request: Request, shape: WaitShape) -> bytes:
        try:
            raw = await read_body(request, self.config.limits.max_body_bytes)
        except ClientLeft:
            raise _Refused(Response(status_code=400)) from None  # nobody reads it
        if isinstance(raw, BadBody):
            raise _refused(shape, raw)
        return raw

    async def _json(self, request: Request, shape: WaitShape) -> tuple[bytes, dict[str, Any]]:
        raw = await self._read(request, shape)
        body = parse_body(raw)
        if isinstance(body, BadBody):
            raise _refused(shape, body)
        if (bad := check_stream(body)) is not None:
            raise _refused(shape, bad)
        return raw, body

    def _model(self, name: Any, shape: WaitShape) -> tuple[str, Model]:
        """The model a request names (by id or alias), or the API's 400/404."""
        if name is None or name == "":
            raise _bad(shape, 400, "The request has no `model`: name one of GET /v1/models.", "missing_field", "model")
        if not isinstance(name, str):
            raise _bad(shape, 400, f"`model` must be a string (the id of one of GET /v1/models), not {name!r}.",
                       "invalid_field", "model")
        model_id = self.config.resolve(name)
        if model_id is None:
            known = ", ".join(self.config.models)
            raise _bad(shape, 404, f"The model `{name}` does not exist. Known models: {known}. Add it to models.yml "
                                   "to use it.", "model_not_found", "model")
        return name, self.config.models[model_id]

    def _upstream_target(self, rest: str) -> tuple[Model, str]:
        """The model and the engine path of /upstream/{model}/{path} (a model id may itself hold slashes)."""
        segments = rest.split("/")
        for n in range(len(segments), 0, -1):
            model_id = self.config.resolve(unquote("/".join(segments[:n])))
            if model_id is not None:
                return self.config.models[model_id], "/" + "/".join(segments[n:])
        known = ", ".join(self.config.models)
        raise _bad(_PLAIN, 404, f"/upstream/{rest}: no model at the start of the path. Use /upstream/MODEL/PATH "
                                f"with one of: {known}.", "model_not_found", "model")

    @staticmethod
    def _engine_body(raw: bytes, body: dict[str, Any], model: Model, changed: bool) -> bytes:
        """What goes to the engine (`body` is changed in place): the client's bytes, unless the model has
        params, another name at the engine (`upstream_model`, or its id when asked for by an alias), or
        the caller `changed` the body. Params first, then the name, as for chat."""
        if has_params(model):
            changed = apply_params(body, model) or changed
        engine_name = _engine_name(model, body.get("model"))
        if engine_name is not None:
            body["model"], changed = engine_name, True
        return encode_json(body) if changed else raw

    async def _relay(self, request: Request, path: str, model: Model, body: bytes, stream: bool, shape: WaitShape,
                     target: str | None = None, method: str = "POST") -> Response:
        priority = PRIORITIES.get(request.headers.get("x-request-priority", "normal").strip().lower())
        if priority is None:
            return shape.error_response(400, "X-Request-Priority must be high, normal or low.", "invalid_header")
        config = self.config
        if target is None:  # the endpoint's own path, with the client's query (Claude Code sends ?beta=true)
            query = request.scope.get("query_string", b"").decode("latin-1")
            target = f"{path}?{query}" if query else path
        call = ApiCall(path=path, model_id=model.id, body=body,
                       headers=upstream_headers(request, drop_auth=bool(config.client_keys)), stream=stream,
                       client_usage=False, ticket=self.switcher.submit(model.id, priority),
                       target=target, method=method, shape=shape)
        try:
            return await self.relay.handle(request, call)
        except BaseException:
            self.switcher.done(call.ticket)
            raise


def _engine_name(model: Model, asked: Any) -> str | None:
    """The model's name at the engine when it is not what the request says (None: leave it)."""
    if model.upstream_model:
        return model.upstream_model
    return model.id if asked != model.id else None  # asked for by an alias


class _AnthropicErrors(PlainShape):
    """Only the error responses of the Messages API (for refusals before a request has its shape)."""

    def error_response(self, status: int, message: str, code: str, param: str | None = None,
                       headers: Mapping[str, str] | None = None) -> Response:
        return anthropic.error_response(status, message, headers)


_PLAIN = PlainShape()
_ANTHROPIC_ERRORS = _AnthropicErrors()
