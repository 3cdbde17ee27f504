"""The one base class for problems a user can fix (bad config, missing data, wrong credentials, a checkpoint
from another world size). Entry points catch :class:`UserError` and print its one-line message, which names the
file or setting and the fix, instead of a traceback from every rank."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the offending file or setting and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key and the fix."""
