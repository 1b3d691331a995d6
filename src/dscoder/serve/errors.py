"""The server's errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the FastAPI handlers
that turn exceptions into them: a client's mistake is a 4xx with one line naming the field, never a traceback."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dscoder.errors import DscoderError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status)


_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first field at fault, what it expected and what it got. A union field
    (``prompt``, ``stop``) reports one error per alternative; they are named together."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if not loc and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return "the body must be a JSON object (send Content-Type: application/json)", None
    # pydantic names a union's alternative in the path (``prompt.list[str].0``): the field is the part before it
    field_parts = []
    for x in loc:
        if isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "dict", "list", "none")):
            break
        field_parts.append(str(x))
    field = ".".join(field_parts) or None
    alternatives = [e for e in errors if [x for x in e.get("loc", ()) if x != "body"][:len(field_parts)]
                    == loc[:len(field_parts)]]
    got = _JSON_TYPES.get(type(first.get("input")), type(first.get("input")).__name__)
    if len(field_parts) < len(loc) and len(alternatives) > 1:
        tags = []
        for e in alternatives:
            rest = [x for x in e.get("loc", ()) if x != "body"][len(field_parts):]
            tag = str(rest[0]).replace("dict[any,any]", "object") if rest else None
            if tag and tag not in tags:
                tags.append(tag)
        msg = f"expected one of: {', '.join(tags)}"
    else:
        msg = first.get("msg", "invalid value")
        if first.get("type") == "missing":
            return (f"{field}: this field is required" if field else msg), field
    if "input" in first and first.get("type") != "missing":
        msg += f" (got {got})"
    return (f"{field}: {msg}" if field else msg), field


def install(app: FastAPI) -> None:
    """Register the handlers that answer every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        message, field = validation_message(list(e.errors()))
        return error_response(400, message, "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail),
                              "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(DscoderError)
    async def _input_error(request, e: DscoderError):  # the request's own input (e.g. text that is not Unicode)
        return error_response(400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")
