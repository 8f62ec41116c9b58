"""Errors a user can act on. Anything else is a bug and ends the job with MPI Abort."""


class RshardError(Exception):
    """A user-facing error: printed once on rank 0, every rank exits non-zero."""

    exit_code = 2


class InputError(RshardError):
    """Bad prompt file, bad weights, bad layout: found before any work starts."""
