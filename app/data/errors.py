"""Bad input: one error type for every reader, check and converter, and its one-line form."""


class DataError(ValueError):
    """Bad input: the message names the file, row group and column."""


def one_line(e: Exception) -> str:
    """An exception's text on one line (Arrow's messages span several)."""
    return " ".join(str(e).split())
