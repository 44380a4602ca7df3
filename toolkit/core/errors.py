"""The one exception family of the toolkit.

Every failure a user can cause or fix is a ToolkitError: a message saying what is wrong and a hint saying how to fix
it. The CLI prints it as the last stderr line, `error: <what> (hint: <how>)`, and exits with `exit_code`.
"""
from __future__ import annotations


class ToolkitError(Exception):
    """Bad input or usage: exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"error: {self.message}{hint}"


class VerificationError(ToolkitError):
    """The work ran but a verification or a gate failed: exit code 1."""

    exit_code = 1


class Interrupted(ToolkitError):
    """Stopped by the user (Ctrl-C) with something to resume from: exit code 130, like a shell."""

    exit_code = 130
