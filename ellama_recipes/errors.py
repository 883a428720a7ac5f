"""User-facing errors.

Anything the user can fix (bad flag, bad config, missing file, malformed input) is raised as
:class:`UserError`. The CLI turns it into a one-paragraph message on stderr and exit code 2, with no
traceback. Bugs stay ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input, with the fix in the message."""

    def __init__(self, message: str, *, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message.rstrip() + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigError(UserError, ValueError):
    """A resolved config failed validate(); ``problems`` lists every issue with its fix."""
