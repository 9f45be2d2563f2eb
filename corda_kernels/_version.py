"""The package version: one place, read by setuptools (pyproject dynamic version) and the code."""

__version__ = "0.1.0"
"""The installed package's version string (PEP 440), also printed by ``corda-kernels --version``."""
