"""Stand-in for vLLM (tests only): see tests/fakes/vllm_standin/README.md."""
__version__ = "0.32.0+standin"
