"""The one exception type for mistakes a user can fix (bad image, bad config, bad checkpoint).

Entry points catch it and print its message as a single line with a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
