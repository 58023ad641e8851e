"""Executing one step: retries, timeouts, injection."""
