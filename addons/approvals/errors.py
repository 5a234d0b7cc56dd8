"""Errors raised by the approvals part (one class; callers catch it at the seams)."""

from __future__ import annotations


class ApprovalError(Exception):
    """A configuration or store problem in approvals, with a message a person can act on."""
