"""The fake nvidia-smi answers exactly like the recorded real one, and its derived layouts follow suit."""
from __future__ import annotations

import shlex

import pytest

from tests.scripts.conftest import RECORDED, fake_smi

QUERY = "--query-gpu=index,name,compute_cap,memory.total,memory.used,memory.free"


def recorded_sessions(name: str) -> list[tuple[list[str], str, int]]:
    """(argv, output, exit status) of each command in a `### $ command` ... `### exit=N` recording."""
    sessions, argv, out = [], None, []
    for line in (RECORDED / name).read_text().splitlines(keepends=True):
        if line.startswith("### $ "):
            argv, out = shlex.split(line[len("### $ "):])[1:], []
        elif line.startswith("### exit="):
            sessions.append((argv, "".join(out), int(line.split("=", 1)[1])))
            argv = None
        elif argv is not None:
            out.append(line)
    return sessions


BUSY = recorded_sessions("with-two-processes.txt")


@pytest.mark.parametrize("argv,expected,status", BUSY, ids=[" ".join(a) or "plain" for a, _, _ in BUSY])
def test_fake_answers_every_recorded_command_of_the_busy_h100_byte_for_byte(argv, expected, status) -> None:
    now = expected.splitlines()[0].rstrip() if not argv else ""
    got = fake_smi("h100-busy", *argv, FAKE_NVIDIA_SMI_NOW=now)
    assert got.stdout == expected
    assert got.returncode == status


def test_fake_answers_the_idle_h100_recordings_byte_for_byte() -> None:
    plain = (RECORDED / "nvidia-smi.txt").read_text()
    assert fake_smi("h100x1", FAKE_NVIDIA_SMI_NOW=plain.splitlines()[0].rstrip()).stdout == plain
    assert fake_smi("h100x1", "-L").stdout == (RECORDED / "nvidia-smi-L.txt").read_text()
    lines = (RECORDED / "query-gpu.txt").read_text().splitlines(keepends=True)
    checked = 0
    for i, line in enumerate(lines):
        if line.startswith("# nvidia-smi "):
            answer = "".join(lines[i + 1:i + 1 + next((j for j, l in enumerate(lines[i + 1:]) if l.startswith("#")),
                                                      len(lines) - i - 1)])
            got = fake_smi("h100x1", *shlex.split(line[2:])[1:])
            assert (got.returncode, got.stdout) == (0, answer), line
            checked += 1
    assert checked == 2


def test_the_recorded_busy_layout_is_the_one_whose_free_memory_the_planner_reads() -> None:
    # the exact query the planner makes, answered from the recording
    assert fake_smi("h100-busy", QUERY, "--format=csv,noheader,nounits").stdout == \
        "0, NVIDIA H100 80GB HBM3, 9.0, 81559, 31771, 49309\n"


@pytest.mark.parametrize("layout,expected", [
    ("h100x2", ["0, NVIDIA H100 80GB HBM3, 9.0, 81559, 0, 81079", "1, NVIDIA H100 80GB HBM3, 9.0, 81559, 0, 81079"]),
    ("h100x4", [f"{i}, NVIDIA H100 80GB HBM3, 9.0, 81559, 0, 81079" for i in range(4)]),
    ("t4", ["0, Tesla T4, 7.5, 15360, 0, 14880"]),
])
def test_derived_layouts_answer_in_the_recorded_format(layout, expected) -> None:
    assert fake_smi(layout, QUERY, "--format=csv,noheader,nounits").stdout.splitlines() == expected
    listing = fake_smi(layout, "-L").stdout.splitlines()
    assert len(listing) == len(expected) and all(line.startswith(f"GPU {i}: ") for i, line in enumerate(listing))
    uuids = fake_smi(layout, "--query-gpu=uuid,pci.bus_id", "--format=csv,noheader").stdout.splitlines()
    assert len(set(uuids)) == len(expected)
    plain = fake_smi(layout).stdout.splitlines()
    assert all(len(line) == 91 for line in plain[1:] if line.startswith(("|", "+")))  # the recorded width


def test_missing_gpu_and_bad_field_fail_as_recorded() -> None:
    missing = fake_smi("h100x2", "-i", "2", QUERY, "--format=csv")
    assert (missing.returncode, missing.stdout) == (6, "No devices were found\n")
    bad = fake_smi("t4", "--query-gpu=index,compute_capability", "--format=csv")
    assert (bad.returncode, bad.stdout) == (2, 'Field "compute_capability" is not a valid field to query.\n\n')


def test_memory_held_by_registered_processes_shows_in_used_free_and_process_list(tmp_path) -> None:
    import os
    (tmp_path / f"gpu-proc-{os.getpid()}.json").write_text(
        f'{{"pid": {os.getpid()}, "gpu_uuid": "GPU-f5f85a40-860d-971d-a29e-51c64b43d558", "used_mib": 36486, "name": "python3"}}')
    (tmp_path / "gpu-proc-999999999.json").write_text(  # a process that is gone counts for nothing
        '{"pid": 999999999, "gpu_uuid": "GPU-f5f85a40-860d-971d-a29e-51c64b43d558", "used_mib": 1000}')
    got = fake_smi("h100x1", QUERY, "--format=csv,noheader,nounits", state=tmp_path)
    assert got.stdout == "0, NVIDIA H100 80GB HBM3, 9.0, 81559, 36501, 44578\n"  # +15 MiB as recorded
    apps = fake_smi("h100x1", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits", state=tmp_path)
    assert apps.stdout == f"{os.getpid()}, 36486\n"
    assert f"{os.getpid()}      C   python3" in fake_smi("h100x1", state=tmp_path).stdout
