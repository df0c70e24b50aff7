"""A worker keeps freed memory for the next large answer (erproxy/memory.py): repeated 5 MB answers
do not page-fault their whole size in again each time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Twenty "answers" of 5.4 MB each (a 256-input embeddings body), made and freed one after another;
# prints the minor page faults they caused.
PROGRAM = """
import resource, sys
sys.path.insert(0, {root!r})
if {tuned}:
    from erproxy.memory import keep_freed_memory
    assert keep_freed_memory()
block = b"x" * 1024
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    answer = block * (5400 * 1024 // 1024)
    answer = answer + b"]"  # a second block of the same size while the first is alive, like a join
    del answer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM.format(root=str(ROOT), tuned=tuned)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_repeated_large_answers_reuse_memory_instead_of_faulting_it_in() -> None:
    plain, tuned = faults(False), faults(True)
    assert plain > 20 * 1000, plain  # ~1,300 pages per 5.4 MB block, every time
    assert tuned < plain / 10, (tuned, plain)


def test_start_up_settles_memory_and_freezes_what_it_built() -> None:
    program = ("import gc, sys; sys.path.insert(0, %r); from erproxy.memory import settle_after_start; "
               "gc.unfreeze(); settle_after_start(); print(gc.get_freeze_count())" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 100
