"""Errors that reach the user as one line (the CLI prints them and exits with 2)."""

from __future__ import annotations


class XTFError(ValueError):
    """A problem with the user's input or environment; the message is one line naming the key, file or line."""


# What to try when the model's outputs are NaN or inf; every check for non-finite scores ends with it.
NON_FINITE_HINT = "broken weights, or float16 overflow; try --dtype float32 or bfloat16"
