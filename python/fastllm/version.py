"""The package version, importable from any layer (the package root re-exports the front ends)."""

__version__ = "0.1.0"
