import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.cli import main
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_checkpoint")
    save_tiny_checkpoint(folder)
    return folder


def test_predict_writes_millimetre_png_metre_npy_and_colour_png(checkpoint, nyu_sample_dir, tmp_path, capsys):
    images = [str(nyu_sample_dir / "00000_colors.png"), str(nyu_sample_dir / "00008_colors.png")]
    assert main(["predict", *images, "--model", str(checkpoint), "--output-dir", str(tmp_path / "out")]) == 0
    for stem in ("00000_colors", "00008_colors"):
        metres = np.load(tmp_path / "out" / f"{stem}_depth.npy")
        assert metres.dtype == np.float32 and metres.shape == (480, 640)
        millimetres = np.asarray(Image.open(tmp_path / "out" / f"{stem}_depth.png"))
        assert millimetres.dtype == np.uint16
        np.testing.assert_array_equal(millimetres, np.rint(metres * 1000).astype(np.uint16))
        colour = Image.open(tmp_path / "out" / f"{stem}_depth_color.png")
        assert colour.mode == "RGB" and colour.size == (640, 480)


def test_existing_outputs_are_kept_unless_overwrite_and_bad_images_are_skipped(checkpoint, nyu_sample_dir, tmp_path,
                                                                              capsys):
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "00000_colors_depth.npy"
    np.save(kept, np.zeros(3, dtype=np.float32))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    good = str(nyu_sample_dir / "00008_colors.png")
    code = main(["predict", str(nyu_sample_dir / "00000_colors.png"), str(broken), good,
                 "--model", str(checkpoint), "--output-dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moa-depthclip:")]
    assert code == 1
    assert len(err) == 2
    assert "00000_colors_depth.npy exists" in err[0] and "--overwrite" in err[0]
    assert str(broken) in err[1] and "empty file" in err[1]
    assert np.load(kept).shape == (3,)  # the user's file is untouched
    assert (out / "00008_colors_depth.png").is_file()
    assert main(["predict", str(nyu_sample_dir / "00000_colors.png"), "--model", str(checkpoint),
                 "--output-dir", str(out), "--overwrite"]) == 0
    assert np.load(kept).shape == (480, 640)


def test_a_missing_model_is_one_line(tmp_path, nyu_sample_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(nyu_sample_dir / "00000_colors.png"), "--model", str(tmp_path / "nowhere"),
              "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "does not exist" in err
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["predict", str(nyu_sample_dir / "00000_colors.png"), "--model", str(empty),
              "--output-dir", str(tmp_path / "out")])
    assert "no config.json" in capsys.readouterr().err


def test_console_script_is_installed_and_answers():
    script = Path(sys.executable).parent / "moa-depthclip"
    script = str(script) if script.exists() else shutil.which("moa-depthclip")
    assert script, "the moa-depthclip console script is not installed"
    completed = subprocess.run([script, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "--output-dir" in completed.stdout
