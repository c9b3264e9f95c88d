"""The one base class of the errors a user can cause: bad config, data, records, checkpoint, a diverged run.

Entry points print a `UserError` as one line and exit 1; anything else is a bug and keeps its
traceback. Each stage defines its own subclass next to the code that raises it.
"""


class UserError(Exception):
    """Something the user can fix (a key, a file, a record): the message says what and how."""
