"""The package version: one place, read by setuptools (pyproject dynamic version) and the code."""

__version__ = "0.1.0"
