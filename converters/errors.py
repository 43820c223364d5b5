"""The one error a reader raises for a file it cannot convert (exit code 2, one line)."""


class ConversionError(ValueError):
    """Unusable input: a bad file, a bad config, or weights that do not fit the model; the message
    names the problem and the fix."""
