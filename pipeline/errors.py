"""Errors that the command line reports as one line and exit code 2 (bad input, nothing written)."""


class InputError(Exception):
    """The user's input is wrong: an unknown name, a missing or inconsistent file."""
