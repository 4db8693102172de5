"""The package version (a base module: every layer may read it without importing the API)."""

__version__ = "0.1.0"
