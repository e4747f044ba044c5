"""``FusetuneError``: a problem with the user's input or setup, with its fix in the message.

The command line prints these as one short message (no traceback) and exits with status 2.
"""


class FusetuneError(Exception):
    """A bad config, data set, model or environment: ``str(error)`` names the problem and the fix."""


class Interrupted(FusetuneError):
    """Training stopped by a signal (Ctrl-C / SIGINT, or SIGTERM): ``str(error)`` says where the last
    checkpoint is and how to resume. The command line prints it without a traceback and exits with
    ``status``: 130 after SIGINT, 143 after SIGTERM (128 + the signal's number, as a shell reports a
    process the signal ended)."""

    def __init__(self, message: str, status: int = 130) -> None:
        super().__init__(message)
        self.status = status
