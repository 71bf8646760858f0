"""The server's typed errors and the one mapping from any error to the HTTP status the front (and
every Ray Serve replica) answers with."""

from __future__ import annotations

from ..errors import ConfigError, InputError, StreamStateError, StreamTCError, VideoSourceError


class ServeError(StreamTCError):
    """A request the server refuses; `status` is the HTTP status the front answers with."""

    status = 400


class StreamNotFound(ServeError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "stream not found"


class AccessDenied(ServeError, PermissionError):
    status = 403


class LimitExceeded(ServeError):
    """A configured limit (streams, queue, sizes, lengths); status 413 or 429."""

    def __init__(self, message: str, status: int = 429) -> None:
        super().__init__(message)
        self.status = status


class StreamClosed(ServeError):
    status = 409


class ReplicaUnavailable(ServeError):
    """A Ray Serve replica that failed (or came back empty) holds the stream."""

    status = 503


def http_status(error: BaseException) -> int:
    """The HTTP status of an error: a `ServeError`'s own, 422 for bad input or settings, 409 for a
    stream in the wrong state, 400 for a source that cannot be read, 500 for anything else."""
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, (InputError, ConfigError)):
        return 422
    if isinstance(error, StreamStateError):
        return 409
    if isinstance(error, VideoSourceError):
        return 400
    return 500


__all__ = ["AccessDenied", "LimitExceeded", "ReplicaUnavailable", "ServeError", "StreamClosed", "StreamNotFound",
           "http_status"]
