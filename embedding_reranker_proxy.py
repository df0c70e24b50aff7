#!/usr/bin/env python3
"""Embedding & reranker gateway for vLLM: `python embedding_reranker_proxy.py [serve|keys ...]`.

The code lives in the `erproxy` package beside this file; see README.md.
"""

import sys

from erproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
