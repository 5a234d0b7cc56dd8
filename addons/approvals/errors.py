"""Errors raised by the approvals part (callers catch them at the seams)."""

from __future__ import annotations


class ApprovalError(Exception):
    """A configuration or store problem in approvals, with a message a person can act on."""


class StoreUnavailable(ApprovalError):
    """The approvals store cannot be reached (Redis down or too slow): what needs it fails closed.

    The message names the store (without its password) and says so: it is the `detail` of the
    `internal_error` denial, and the admin API's 503 message."""
