"""Fixtures shared by the process tests."""

import pytest

from tests.procs import start_fake


@pytest.fixture
def own_fakes(tmp_path):
    """A fake embedding and a fake reranker of this test's own, for tests that switch their mode."""
    embed, rerank = start_fake(tmp_path, "embed"), start_fake(tmp_path, "rerank")
    yield embed, rerank
    embed.stop()
    rerank.stop()
