"""What can go wrong with a request, as types: the engine raises or reports these, and the server maps each
kind to its HTTP status and OpenAI error type without reading the message."""

from __future__ import annotations


class EngineError(Exception):
    """A request failed; `status` and `type` say how the HTTP layer reports it."""

    status = 500
    type = "server_error"


class InvalidRequest(EngineError, ValueError):
    """The request cannot be served as given (bad settings, too long, malformed inputs)."""

    status = 400
    type = "invalid_request_error"


class NotFound(EngineError, LookupError):
    """The request names a model or adapter this server does not hold (now)."""

    status = 404
    type = "invalid_request_error"


class QueueFull(EngineError, RuntimeError):
    """The engine's waiting queue is full, or it is shutting down; try again later."""

    status = 429
    type = "rate_limit_error"


class RequestTimeout(EngineError):
    """The request ran past its deadline."""

    status = 408
    type = "timeout_error"


class EngineFailure(EngineError, RuntimeError):
    """The engine itself broke (a model error mid-step); every running request gets this."""

    status = 500
    type = "server_error"


class Cancelled(EngineError):
    """The client went away or cancelled the request."""

    status = 499
    type = "cancelled"


class ShuttingDown(EngineError):
    """The server is shutting down: it takes no new requests, and one still running when the drain time
    is over ends with this."""

    status = 503
    type = "server_error"
