"""Tollgate: a rate-limiting and metering reverse proxy for OpenAI-compatible chat APIs."""

__version__ = "0.1.0"
