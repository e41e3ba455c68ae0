"""The error the ffnn commands report as a one-line message (no traceback)."""


class FFNNError(Exception):
    """A problem with the user's input: missing data, a corrupt file, a mismatched checkpoint."""
