"""effopt's version: part of every cache and tuning-database key."""
__version__ = "0.1.0"
