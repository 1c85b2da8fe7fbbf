"""The package's version, recorded in every bundle's manifest (``versions.badexpert``)."""

__version__ = "0.1.0"
