"""The one project base class of errors: ``except pc.PromptControlError`` catches every error promptcontrol raises
of its own kind. Each such error also keeps its built-in type (``SessionError`` is a ``RuntimeError``, bad output
paths are ``ValueError``/``OSError``, ...), so code that catches the built-in types keeps working. Plain bad
arguments raise the built-in ``TypeError`` / ``ValueError`` / ``KeyError`` with a message naming the fix."""

from __future__ import annotations


class PromptControlError(Exception):
    """Base class of promptcontrol's own errors."""
