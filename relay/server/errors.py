"""The relay's HTTP error answers: OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

from aiohttp import web


def error_response(status: int, code: str, message: str, error_type: str = "invalid_request_error",
                   param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param}}
    return web.json_response(body, status=status, headers=headers)


# aiohttp's own refusals (no such route, wrong method, a body over client_max_size), as the API's codes.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def json_errors(body_limit: int):
    """Errors aiohttp raises itself answered in the API's JSON shape (it would answer in plain text)."""

    @web.middleware
    async def as_json(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = HTTP_ERROR_CODES.get(exc.status, "invalid_request")
            message = f"The request body is limited to {body_limit} bytes." if exc.status == 413 else exc.reason
            headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
            return error_response(exc.status, code, message, headers=headers)

    return as_json
