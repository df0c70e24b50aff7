"""Embedding & reranker gateway: one authenticated, rate-limited endpoint in front of vLLM."""

__version__ = "0.1.0"
