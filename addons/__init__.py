"""Portcullis: an egress-filtering forward proxy for AI coding-agent containers."""

__version__ = "0.1.0"
