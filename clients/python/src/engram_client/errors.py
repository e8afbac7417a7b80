"""The one exception the client raises for a refused or failed call."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS = "grpc-status-details-bin"
# The gateway's rate-limit hint, also sent as a google.rpc.RetryInfo detail.
_RETRY_AFTER_MS = "retry-after-ms"


@dataclass(frozen=True)
class FieldViolation:
    # The request field at fault, e.g. "memories[2].text".
    field: str
    description: str


class EngramError(Exception):
    """A call engram refused or could not serve.

    ``code`` is the gRPC status code (``grpc.StatusCode.INVALID_ARGUMENT``, ...); ``field`` the
    request field an INVALID_ARGUMENT names (from its ``google.rpc.BadRequest`` detail), ``None``
    otherwise; ``violations`` every field the server named; ``retry_after`` the seconds the
    server asked the client to wait (rate limits), ``None`` when it did not say.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.violations = violations
        self.retry_after = retry_after
        where = f" ({violations[0].field})" if violations else ""
        super().__init__(f"{code.name}{where}: {message}")

    @property
    def field(self) -> str | None:
        return self.violations[0].field if self.violations else None


def from_rpc_error(error: grpc.RpcError, metadata) -> EngramError:
    """An ``EngramError`` from a failed call and its trailing metadata."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for key, value in metadata or ():
        if key == _DETAILS and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a malformed detail is not worth hiding the error for
                continue
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations += [
                        FieldViolation(v.field, v.description) for v in bad.field_violations
                    ]
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    retry_after = info.retry_delay.ToNanoseconds() / 1e9
        elif key == _RETRY_AFTER_MS and retry_after is None:
            try:
                retry_after = int(value) / 1000
            except (TypeError, ValueError):
                pass
    return EngramError(code or grpc.StatusCode.UNKNOWN, message or "", tuple(violations), retry_after)
