"""A clone stands alone: nothing the project runs or reads lies outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A folder beside the clone (the parent's `shared` or `fixtures`), a path computed above the repository root from
# a file's location, or the absolute path of some machine's checkout.
OUTSIDE = re.compile(r"\.\./(shared|fixtures)\b|parents\[\d\]\s*/\s*[\"']shared[\"']|/work/main\b")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in names.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:4096]:
            files.append(path)
    return files


def test_no_tracked_file_names_a_path_outside_the_repository():
    offenders = []
    for path in tracked_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path != Path(__file__):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_recorded_vllm_answers_are_tracked_in_the_repository():
    tracked = {p.relative_to(ROOT).as_posix() for p in tracked_text_files()}
    recordings = {n for n in tracked if n.startswith("tests/fixtures/vllm-0.32-cpu/")}
    assert "tests/fixtures/vllm-0.32-cpu/embed_float_single.json" in recordings
    assert "tests/fixtures/vllm-0.32-cpu/rerank_models.json" in recordings
    assert any(n.startswith("tests/fixtures/nvidia-smi-h100/") for n in tracked)


def test_ci_runs_the_readme_test_command_in_a_fresh_clone():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "git clone" in ci and "mktemp -d" in ci
    assert ci.rstrip().splitlines()[-1].strip() == "make test"
