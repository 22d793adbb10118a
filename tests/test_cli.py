import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.cli.predict import main


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


def test_folders_batches_and_dtype(checkpoint, nyu_sample_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["b.png", "a.png", "c.jpg"]
    for name, frame in zip(names, ["00000", "00008", "00014"]):
        Image.open(nyu_sample_dir / f"{frame}_colors.png").convert("RGB").save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    one = tmp_path / "one"
    assert main(["predict", str(photos), "--model", str(checkpoint), "--output-dir", str(one)]) == 0
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if "depth" in line]
    assert printed == [str(photos / n) for n in ("a.png", "b.png", "c.jpg")]  # the folder's images, sorted
    batched = tmp_path / "batched"
    assert main(["predict", str(photos), "--model", str(checkpoint), "--output-dir", str(batched),
                 "--batch-size", "2"]) == 0
    for stem in ("a", "b", "c"):
        np.testing.assert_allclose(np.load(batched / f"{stem}_depth.npy"), np.load(one / f"{stem}_depth.npy"),
                                   atol=1e-4)
    assert not (one / "notes_depth.npy").exists()
    bf16 = tmp_path / "bf16"
    assert main(["predict", str(photos / "a.png"), "--model", str(checkpoint), "--output-dir", str(bf16),
                 "--dtype", "bfloat16"]) == 0
    depth = np.load(bf16 / "a_depth.npy")
    assert depth.dtype == np.float32
    assert not np.array_equal(depth, np.load(one / "a_depth.npy"))  # really ran in bf16
    np.testing.assert_allclose(depth, np.load(one / "a_depth.npy"), rtol=0.05, atol=0.05)
    # the output folder inside the input folder: its own outputs are not read as inputs on a second run
    assert main(["predict", str(photos), "--model", str(checkpoint), "--output-dir", str(photos)]) == 0
    assert main(["predict", str(photos), "--model", str(checkpoint), "--output-dir", str(photos),
                 "--overwrite"]) == 0
    assert not (photos / "a_depth_depth.npy").exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_batch_size_must_be_positive(value, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["predict", "x.png", "--model", "m", "--output-dir", str(tmp_path), "--batch-size", value])
    assert "--batch-size" in capsys.readouterr().err


def test_an_empty_folder_is_reported_and_the_rest_still_runs(checkpoint, nyu_sample_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["predict", str(empty), str(nyu_sample_dir / "00000_colors.png"), "--model", str(checkpoint),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moa-depthclip:")]
    assert len(err) == 1 and str(empty) in err[0] and "no image files" in err[0]
    assert (tmp_path / "out" / "00000_colors_depth.npy").is_file()


def test_version(capsys):
    from modeling_moa_depthclip import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"moa-depthclip {__version__} ") and "transformers" in out and out.count("\n") == 1


def _one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_a_folder_that_is_not_a_depth_model_is_one_line(tmp_path, nyu_sample_dir, capsys):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=50)).save_pretrained(bert)
    capsys.readouterr()
    err = _one_error_line(capsys, ["predict", str(nyu_sample_dir / "00000_colors.png"), "--model", str(bert),
                                   "--output-dir", str(tmp_path / "out")])
    assert str(bert) in err and "not a depth model" in err


def test_missing_or_truncated_weights_are_one_line(checkpoint, tmp_path, nyu_sample_dir, capsys):
    import shutil

    image = str(nyu_sample_dir / "00000_colors.png")
    missing = tmp_path / "missing"
    shutil.copytree(checkpoint, missing)
    (missing / "model.safetensors").unlink()
    err = _one_error_line(capsys, ["predict", image, "--model", str(missing), "--output-dir", str(tmp_path / "o")])
    assert str(missing) in err and "model.safetensors" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _one_error_line(capsys, ["predict", image, "--model", str(truncated), "--output-dir", str(tmp_path / "o")])
    assert str(truncated) in err and "truncated" in err
    assert not (tmp_path / "o").exists()  # nothing written for a model that did not load


def test_console_script_is_installed_and_answers():
    script = Path(sys.executable).parent / "moa-depthclip"
    script = str(script) if script.exists() else shutil.which("moa-depthclip")
    assert script, "the moa-depthclip console script is not installed"
    completed = subprocess.run([script, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "--output-dir" in completed.stdout


def test_the_pipeline_loader_raises_model_load_error_and_main_prints_one_line(tmp_path, capsys):
    from modeling_moa_depthclip.cli.predict import load_depth_pipeline, main
    from modeling_moa_depthclip.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):  # a library function: no SystemExit
        load_depth_pipeline(str(tmp_path / "missing"), "cpu")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(image), "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing does not exist" in err


# ---------------------------------------------------------------- checks before the model is loaded


@pytest.fixture
def no_model(monkeypatch):
    """The CLI must not reach the model loader."""
    from modeling_moa_depthclip.cli import predict

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded although the run could be refused first")

    monkeypatch.setattr(predict, "load_depth_pipeline", refuse)


def _photo(path, size=(40, 30)):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_an_existing_output_is_refused_before_the_model_is_loaded(no_model, tmp_path, capsys):
    photo = _photo(tmp_path / "room.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "room_depth.png").write_bytes(b"the user's file")
    code = main(["predict", str(photo), "--model", str(tmp_path / "no_such_model"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "room_depth.png exists (pass --overwrite to replace it)" in err and "the model was not loaded" in err
    assert "no_such_model" not in err  # the model was never looked at
    assert (out / "room_depth.png").read_bytes() == b"the user's file"


def test_missing_and_unreadable_inputs_are_refused_before_the_model_is_loaded(no_model, tmp_path, capsys):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    code = main(["predict", str(tmp_path / "missing.png"), str(empty), str(text), "--model", "any/hub-id",
                 "--output-dir", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moa-depthclip:")]
    assert code == 1
    assert "missing.png: no such file" in err[0] and "empty.png: empty file" in err[1]
    assert "notes.jpg: not a readable image" in err[2] and "the model was not loaded" in err[3]
    assert not (tmp_path / "out").exists()  # nothing created either


@pytest.mark.parametrize(
    "options, message",
    [(["--fov", "60"], "add --point-cloud"), (["--intrinsics", "nyu"], "add --point-cloud"),
     (["--point-cloud", "--fov", "60", "--intrinsics", "nyu"], "not allowed with argument")],
)
def test_option_combinations_are_refused_before_the_model_is_loaded(no_model, tmp_path, capsys, options, message):
    photo = _photo(tmp_path / "room.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(photo), "--model", "m", "--output-dir", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_is_loaded(no_model, tmp_path, capsys):
    photo = _photo(tmp_path / "room.png")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit):
        main(["predict", str(photo), "--model", "m", "--output-dir", str(tmp_path / "out")])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_problems_are_reported_before_the_model_loads_and_the_rest_runs(checkpoint, tmp_path, capsys, monkeypatch):
    from modeling_moa_depthclip.cli import predict

    reported_before_loading = []
    real_loader = predict.load_depth_pipeline

    def loader(*args, **kwargs):
        reported_before_loading.append(capsys.readouterr().err)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(predict, "load_depth_pipeline", loader)
    good, broken = _photo(tmp_path / "good.png"), tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    assert main(["predict", str(broken), str(good), "--model", str(checkpoint), "--output-dir",
                 str(tmp_path / "out")]) == 1
    assert len(reported_before_loading) == 1 and "broken.png: " in reported_before_loading[0]
    assert (tmp_path / "out" / "good_depth.npy").is_file() and not (tmp_path / "out" / "broken_depth.npy").exists()


def test_a_depth_map_input_is_named_and_ground_truth_beside_photos_is_skipped(checkpoint, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for stem in ("00000", "00001"):
        _photo(folder / f"{stem}_colors.png")
        Image.fromarray(np.full((30, 40), 2500, np.uint16)).save(folder / f"{stem}_depth.png")
    _photo(folder / "holiday_depth.jpg")  # no holiday_colors beside it: a photo with an unlucky name, kept
    lone_depth = tmp_path / "sensor.png"
    Image.fromarray(np.full((30, 40), 1800, np.uint16)).save(lone_depth)
    out = tmp_path / "out"
    assert main(["predict", str(folder), str(lone_depth), "--model", str(checkpoint), "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("moa-depthclip:")]
    assert notes == [
        f"moa-depthclip: note: {folder}: skipped 2 *_depth.* file(s) beside *_colors.* photographs (ground-truth "
        "depth maps, not photographs)",
        f"moa-depthclip: warning: {lone_depth} has one 16-bit channel: it looks like a depth map, not a photograph "
        "(predicting on it anyway)",
    ]
    written = sorted(p.name for p in out.glob("*_depth.npy"))
    assert written == ["00000_colors_depth.npy", "00001_colors_depth.npy", "holiday_depth_depth.npy",
                       "sensor_depth.npy"]
