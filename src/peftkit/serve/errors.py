"""The server's errors: a :class:`ServeError` carries the HTTP status and the OpenAI error fields."""

from __future__ import annotations

from typing import Any, Optional

from ..errors import PeftkitError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class ServeError(PeftkitError):
    """A request the server refuses or could not finish, answered as OpenAI's error JSON."""

    def __init__(self, message: str, status: int = 400, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers."""
        return {"error": {"message": str(self), "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


__all__ = ["ServeError"]
