"""The package version, in the lowest layer so manifests can record it without importing the package."""

__version__ = "0.1.0"
