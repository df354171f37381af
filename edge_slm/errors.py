"""Exceptions edge-slm raises for a user's mistake or a bad file.

Each carries a one-line message naming what was wrong; the CLI prints it and
exits non-zero, without a traceback."""

from numbers import Integral


def is_whole(value: object, least: int) -> bool:
    """Whether a setting is a whole number >= least (True and 2.0 are not)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= least


class EdgeSlmError(Exception):
    """Base class: anything the user can fix."""


class ModelError(EdgeSlmError):
    """A model file that is missing, truncated, corrupt or inconsistent."""


class UnsupportedModel(ModelError):
    """A well-formed model file using an architecture, type or vocabulary we do not run."""


class BadText(EdgeSlmError):
    """Text that cannot be tokenized (not valid UTF-8)."""


class ContextOverflow(EdgeSlmError):
    """A prompt that does not fit in the context window."""


class PullError(EdgeSlmError):
    """The default model could not be fetched or did not verify."""
