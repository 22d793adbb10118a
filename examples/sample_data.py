"""Where the example scripts and benchmarks look for the real NYU frames by default: the shared folder beside the
repository (the package itself takes a folder or `$MOA_DEPTHCLIP_NYU_SAMPLE`, see
`modeling_moa_depthclip.evaluation.nyu_sample_dir`)."""

from pathlib import Path

NYU_SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nyu_eigen_test_sample"
