"""qdquant's own exceptions.

Every bad input raises :class:`InputError` with a one-line message that names
the file (or key, or row) and what is wrong; the command line prints that line
and exits non-zero.
"""


class QdquantError(Exception):
    """Base class of qdquant's errors."""


class InputError(QdquantError, ValueError):
    """Bad input: a file, a config key, a table row or an array argument."""
