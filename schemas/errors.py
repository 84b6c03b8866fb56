"""The one family of expected failures: the command line prints them as `error: <one line>`, exit 2.

Anything else that escapes a stage is a bug and keeps its traceback (so that users can report it).
"""


class InputError(Exception):
    """The user's input (or an artefact userpipe wrote, since damaged) is wrong; the message names it."""

    def __str__(self) -> str:
        # one line, whatever a quoted value or a library's explanation brought in (YAML's are multi-line)
        return " ".join(super().__str__().split())


class ManifestError(InputError):
    """A manifest (of shards, of an index) is missing or damaged; the message names it."""


class NotLearningError(InputError):
    """A training run whose first validation is within noise of its untrained start, stopped as its config
    asked (train.stop_if_not_learning)."""


class NonFiniteError(InputError):
    """NaN or infinite numbers where a result would be computed from them (a diverged model, a damaged
    artefact): refused, since a NaN similarity ranks like a perfect one and a NaN loss trains nothing."""
