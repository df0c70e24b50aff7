"""`pip install .` installs the gateway with its dependencies and a console script."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_package_entry_point_and_requirements(tmp_path):
    src = tmp_path / "src"  # build from a copy: an in-tree build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", "embedding_reranker_proxy.py"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "erproxy", src / "erproxy", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(src)], check=True, timeout=300, capture_output=True)
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith("METADATA"))
        metadata = z.read(meta).decode()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "embedding_reranker_proxy.py" in names and "erproxy/app.py" in names
    for req in Path(ROOT / "requirements.txt").read_text().splitlines():
        name = req.split(">")[0].split("[")[0].split(";")[0].strip()
        if name and not name.startswith("#"):
            assert f"Requires-Dist: {name}" in metadata, name
    assert "embedding-reranker-proxy = erproxy.cli:main" in entry
