"""`benchmarks/run.py --device cuda` without a GPU: one line saying so, printed and written into BENCHMARKS.md."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available: the GPU section measures instead")
def test_without_a_gpu_the_gpu_section_is_one_line(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--device", "cuda", "--output", str(output),
         "--results-dir", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    (line,) = [text for text in completed.stdout.splitlines() if text.startswith("No GPU available")]
    assert "torch.cuda.is_available() is False" in line
    report = output.read_text()
    gpu_section = report[report.index("## 9. GPU"):]
    assert gpu_section.strip().splitlines() == ["## 9. GPU", "", line]
    assert (tmp_path / "results" / "gpu.json").is_file()
