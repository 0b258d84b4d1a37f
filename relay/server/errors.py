"""The relay's HTTP error answers: OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

from aiohttp import web


def error_response(status: int, code: str, message: str, error_type: str = "invalid_request_error",
                   param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param}}
    return web.json_response(body, status=status, headers=headers)
