"""The one exception type for mistakes a user can fix (bad image, bad config, bad checkpoint),
and the argument parser the command-line tools share.

Entry points catch UserError and print its message as a single line with a non-zero exit;
anything else is a bug and keeps its traceback.
"""

import argparse


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one `error:` line (exit 2) instead of a usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")
