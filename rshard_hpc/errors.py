"""Errors a user can act on. Anything else is a bug and ends the job with MPI Abort."""


class RshardError(Exception):
    """A user-facing error: printed once on rank 0, every rank exits non-zero."""

    exit_code = 2


class InputError(RshardError):
    """Bad prompt file, bad weights, bad layout: found before any work starts."""


class JobAborted(RshardError):
    """A user-facing error after the job has started (a full disk mid-run): the rank that met it prints it and
    the whole job ends by MPI Abort with this status; every finished batch stays in the results file."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
