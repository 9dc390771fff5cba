"""Exceptions of the package (raised by the native module too)."""

from __future__ import annotations


class XzeprClientError(Exception):
    """Base exception for XZepr client errors (also: no answer, a timeout, a bad body)."""


class XzeprApiError(XzeprClientError):
    """The server answered with an error status."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        self.message = message
        super().__init__(f"API error ({status_code}): {message}")


class XzeprAuthError(XzeprClientError):
    """401/403: the token was refused, or none was sent to a server that wants one."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class XzeprNotFoundError(XzeprClientError):
    """404: the receiver or event does not exist."""

    def __init__(self, message: str, status_code: int = 404) -> None:
        self.status_code = status_code
        super().__init__(message)


class ConfigError(ValueError):
    """A setting the consumer refuses, named in the message."""


class DecodeError(ValueError):
    """A payload that is not an XZepr CloudEvent.

    ``kind`` says what is wrong (``invalid_json``, ``not_an_object``,
    ``missing_attribute``, ``wrong_type``, ``unsupported_specversion``,
    ``payload_too_large``, ``too_deep``, ``invalid_header``, ``data_shape``);
    ``field`` names the attribute at fault and ``offset`` the byte, when known.
    """

    def __init__(
        self,
        message: str,
        kind: str = "other",
        field: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.kind = kind
        self.field = field
        self.offset = offset
        super().__init__(message)


class XzeprConsumerError(RuntimeError):
    """The consumer stopped on an error (e.g. the broker refused the credentials)."""


class PermanentError(Exception):
    """A handler failure never to retry (bad input, a rule it broke): raised by
    a handler, or returned for one message by a batch handler, it goes straight
    to the dead letter (if one is set) and ``failed``, whatever the retry
    policy."""
