"""Errors that reach the user as one line (the CLI prints them and exits with 2)."""

from __future__ import annotations


class XTFError(Exception):
    """A problem with the user's input or environment; the message is one line naming the key, file or line."""
