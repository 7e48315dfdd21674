"""The benchmark's GPU memory sampler against a stand-in nvidia-smi (no GPU here): it reads the
server process's own row, and falls back to the whole card's memory where nvidia-smi does not list
the process (PID namespaces of containers), so a GPU session never gets a column of zeros."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_builtin  # noqa: E402  (a script folder, not a package)


def fake_nvidia_smi(folder: Path, apps: str, used: str = "", name: str = "NVIDIA H100 80GB HBM3") -> None:
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  --query-compute-apps=*) printf '{apps}' ;;\n"
        f"  --query-gpu=memory.used) printf '{used}' ;;\n"
        f"  --query-gpu=name) printf '{name}\\n' ;;\n"
        "  *) exit 9 ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def smi_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return tmp_path


def test_reads_the_process_row(smi_dir):
    fake_nvidia_smi(smi_dir, apps="111, 900\\n4242, 20480\\n", used="30000\\n")
    sampler = compare_builtin.GpuMemorySampler(4242)
    assert sampler.read_kib() == 20480 * 1024
    assert sampler.whole_gpu is False


def test_falls_back_to_the_whole_card_when_the_pid_is_not_listed(smi_dir, capsys):
    fake_nvidia_smi(smi_dir, apps="", used="30000\\n")
    sampler = compare_builtin.GpuMemorySampler(4242)
    assert sampler.read_kib() == 30000 * 1024
    fake_nvidia_smi(smi_dir, apps="4242, 20480\\n", used="31000\\n")  # from then on the card is what is read
    assert sampler.read_kib() == 31000 * 1024
    assert sampler.whole_gpu is True
    assert capsys.readouterr().out.count("whole card") == 1


def test_no_nvidia_smi_reads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert compare_builtin.GpuMemorySampler(4242).read_kib() is None
    assert compare_builtin.gpu_name() is None


def test_gpu_name_and_peak(smi_dir):
    fake_nvidia_smi(smi_dir, apps="")
    name = compare_builtin.gpu_name()
    assert name == "NVIDIA H100 80GB HBM3"
    assert compare_builtin.peak_tflops(name) == 989.4
    assert compare_builtin.peak_tflops("NVIDIA H100 PCIe") == 756.0
