"""``FusetuneError``: a problem with the user's input or setup, with its fix in the message.

The command line prints these as one short message (no traceback) and exits with status 2.
"""


class FusetuneError(Exception):
    """A bad config, data set, model or environment: ``str(error)`` names the problem and the fix."""
