"""Errors the tool knows how to report.

Every failure a user can cause (a missing file, a truncated header, an unpaired factor, a bad option)
is raised as :class:`InspectError` with one line that names the culprit and, where there is one, the fix.
The CLI turns it into that line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import copy

__all__ = ["InspectError", "OptionError", "UnpairedFactorError", "EXIT_OK", "EXIT_RULE_FAILED", "EXIT_BAD_INPUT"]

EXIT_OK = 0
EXIT_RULE_FAILED = 1
EXIT_BAD_INPUT = 2


class InspectError(Exception):
    """Bad input or usage: one line for the user, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None, option: str | None = None):
        self.message = message
        self.hint = hint
        self.option = option  # the request parameter the hint is about (a command names its flag)
        super().__init__(message if hint is None else f"{message} ({hint})")

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"

    def located(self, where: object) -> "InspectError":
        """The same error naming the file it is about (``FILE: message``), unless it already does;
        raised where a file is read, so messages from inner code (a module's shapes) still say which
        file they are about."""
        w = str(where)
        if self.message.startswith(w):
            return self
        new = copy.copy(self)
        new.message = f"{w}: {self.message}"
        new.args = (str(new),)
        return new


class UnpairedFactorError(InspectError):
    """An A without its B (or the reverse): unreadable, and also a `check` failure of its own
    (no server can load such an adapter), so the gate reports it per adapter instead of stopping."""


class NonFiniteUpdate(InspectError):
    """Finite factors whose product is not: ΔW overflows float64 (entries beyond ~1.8e308), so no
    consumer can apply it. Analyses flag the module (as for NaN/inf weights); rewrites refuse it."""

    def __init__(self, message: str = "ΔW overflows float64 (its factors' product is not finite)"):
        super().__init__(message)


class OptionError(InspectError):
    """A bad request value (a rank, an energy, a factor): the message names the parameter as the
    library calls it (``energy``), ``option`` holds that name so a command can name its flag."""

    def __init__(self, option: str, message: str):
        super().__init__(message, option=option)
