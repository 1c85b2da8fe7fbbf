"""Errors that are the user's to fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, an option, a folder). The message says what to do."""


class BundleIntegrityError(UserError):
    """A bundle whose files do not match the hashes in its manifest."""
