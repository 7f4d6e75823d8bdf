"""The project's error type: raised for bad input, caught by the CLI and printed without a traceback."""


class SphinxError(ValueError):
    """A user-facing error whose message names the problem (bad file, bad config, mismatch...)."""
