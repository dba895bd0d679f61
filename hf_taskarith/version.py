"""The library version, recorded in every artifact the library writes."""

__version__ = "0.1.0"
