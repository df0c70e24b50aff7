"""Helpers for the project's own tooling (tests/ and bench/); not part of the gateway package."""
