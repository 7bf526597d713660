"""OpenAI's error envelope ``{"error": {message, type, param, code}}`` for every failure.

Anything the client did wrong is a 4xx naming the field at fault; an unexpected exception is logged
with its traceback and answered as a bare 500 envelope, never with the traceback itself.
"""

from __future__ import annotations

import json
import logging
import re
import types
import typing
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from msgspec import Struct

log = logging.getLogger("alignd.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(Struct):
    """OpenAI's error shape; every 4xx/5xx the API returns has it."""

    error: ErrorBody


ERROR_STATUSES = {400: "Invalid request (the message and param name the field at fault)",
                  401: "Missing or invalid API key", 404: "No such object in your organization",
                  409: "Conflict with the object's state or an earlier request",
                  413: "Request body or upload too large", 429: "Rate or concurrency limit (see Retry-After)"}


def document_errors(*controllers: type) -> None:
    """Declare the error envelope for every status a route can answer, so clients and fuzzers
    see the real contract instead of Litestar's default validation schema."""
    responses = {status: ResponseSpec(data_container=ErrorEnvelope, description=text, generate_examples=False)
                 for status, text in ERROR_STATUSES.items()}
    for controller in controllers:
        for value in vars(controller).values():
            if isinstance(value, HTTPRouteHandler):
                value.responses = {**responses, **(value.responses or {})}


def document_unavailable(handler: HTTPRouteHandler) -> None:
    """A route that needs a worker answers 503 with Retry-After when none is free."""
    handler.responses = {**(handler.responses or {}), 503: ResponseSpec(
        data_container=ErrorEnvelope, description="No worker is free to run it (see Retry-After)",
        generate_examples=False)}


class APIError(Exception):
    """Raised by services and handlers; rendered as the envelope with ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def not_found(kind: str, object_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {kind}: '{object_id}'", code=f"{kind}_not_found", param=param)


def envelope(status: int, message: str, code: str | None, param: str | None,
             headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    body = {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}
    return Response(content=body, status_code=status, headers=headers)


_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _param_from_msgspec(message: str) -> tuple[str, str | None]:
    """msgspec says "Object contains unknown field `x` - at `$.method.dpo`"; turn it into a param path."""
    match = _MSGSPEC_PATH.match(message.strip())
    if not match:
        return message, None
    text, path = match.group("msg"), (match.group("path") or "").lstrip(".")
    unknown = re.search(r"unknown field `([^`]+)`", text)
    missing = re.search(r"missing required field `([^`]+)`", text)
    field = unknown or missing
    if field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
    path = re.sub(r"\[(\d+)\]", r"[\1]", path)
    return text, path or None


def _pick(tp: Any, value: Any) -> Any:
    """The member of a (possibly Annotated/Optional/tagged-union) type that ``value`` decodes as."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp
    for member in typing.get_args(tp):
        member = _pick(member, value)
        if isinstance(member, type) and issubclass(member, msgspec.Struct) and isinstance(value, dict):
            config = member.__struct_config__
            if config.tag_field is None or value.get(config.tag_field) == config.tag:
                return member
        elif (typing.get_origin(member), type(value)) in ((dict, dict), (list, list)):
            return member
    return tp


def _name_dict_keys(param: str, data_type: Any, body: Any) -> str:
    """msgspec reports a bad dict value as ``graders[...]``; find which key, so the param names it.

    msgspec decodes a dict's values in order and stops at the first bad one, so the first key whose
    value does not convert alone is the one it meant.
    """
    tokens = re.findall(r"\[\.\.\.\]|\[\d+\]|[^.\[\]]+", param)
    out: list[str] = []
    tp, value = data_type, body
    for token in tokens:
        tp = _pick(tp, value)
        if token == "[...]":
            if typing.get_origin(tp) is not dict or not isinstance(value, dict):
                return param
            value_type = typing.get_args(tp)[1]
            for key, item in value.items():
                try:
                    msgspec.convert(item, value_type)
                except msgspec.ValidationError:
                    out.append(f".{key}")
                    tp, value = value_type, item
                    break
            else:
                return param
        elif token.startswith("["):
            if not isinstance(value, list):
                return param
            index = int(token[1:-1])
            args = typing.get_args(tp)
            out.append(token)
            tp, value = (args[0] if args else Any), (value[index] if index < len(value) else None)
        else:
            fields = {f.encode_name: f.type for f in msgspec.structs.fields(tp)} \
                if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else {}
            out.append(f".{token}" if out else token)
            tp, value = fields.get(token, Any), (value.get(token) if isinstance(value, dict) else None)
    return "".join(out)


def _refine(request: Request[Any, Any, Any], param: str | None) -> str | None:
    if not param or "[...]" not in param:
        return param
    try:
        raw = request._connection_state.body  # cached by litestar when it decoded the body
        body = json.loads(raw if isinstance(raw, bytes) else b"")
        data_type = request.route_handler.parsed_fn_signature.parameters["data"].annotation
        return _name_dict_keys(param, data_type, body)
    except Exception:  # noqa: BLE001 - a better param is a nicety; the 400 stands without it
        return param


def handle_api_error(_: Request[Any, Any, Any], exc: APIError) -> Response[dict[str, Any]]:
    return envelope(exc.status, exc.message, exc.code, exc.param, exc.headers)


def handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        first = extra[0]
        raw = str(first.get("message", exc.detail))
        key = str(first["key"]) if first.get("key") else ""
        key = "" if key == "data" else key.removeprefix("data.")
        text, param = _param_from_msgspec(raw)
        if key and param and not param.startswith(key):
            param = f"{key}.{param}"  # litestar strips the path into "key"; msgspec names the leaf
        param = _refine(request, param or key or None)
        message = f"{param}: {text}" if param else text
        return envelope(400, message, "invalid_request", param)
    text, param = _param_from_msgspec(str(exc.detail))
    return envelope(400, text, "invalid_request", _refine(request, param))


def handle_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if isinstance(exc, NotFoundException):
        return envelope(404, "Not found", "not_found", None)
    if status >= 500:
        log.error("HTTP %s: %s", status, exc.detail)
        return envelope(status, "The server could not answer this request.", "server_error", None)
    return envelope(status, str(exc.detail), None, None, dict(exc.headers or {}))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return envelope(HTTP_500_INTERNAL_SERVER_ERROR, "The server had an error while processing your request.",
                    "server_error", None)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: handle_api_error,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    Exception: handle_unexpected,
}
