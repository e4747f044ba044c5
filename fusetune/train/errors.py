"""``FusetuneError``: a problem with the user's input or setup, with its fix in the message.

The command line prints these as one short message (no traceback) and exits with status 2.
"""


class FusetuneError(Exception):
    """A bad config, data set, model or environment: ``str(error)`` names the problem and the fix."""


class Interrupted(FusetuneError):
    """Training stopped by Ctrl-C / SIGINT: ``str(error)`` says where the last checkpoint is and how
    to resume. The command line prints it without a traceback and exits with status 130."""
