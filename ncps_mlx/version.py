"""The package's version, in a module of its own so the writers can stamp files without
importing the package (an import cycle)."""

__version__ = "0.1.0"
