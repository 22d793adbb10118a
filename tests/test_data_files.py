"""Tests for DenseDepth/BTS list files as users write them: byte-order marks, CRLF, absolute and relative paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.data import load_depth_dataset


def _frame(folder: Path, stem: str, depth_mm: int = 1500) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb, depth = folder / f"{stem}_colors.png", folder / f"{stem}_depth.png"
    Image.fromarray(np.full((3, 4, 3), 90, np.uint8)).save(rgb)
    Image.fromarray(np.full((3, 4), depth_mm, np.uint16)).save(depth)
    return rgb, depth


def test_csv_with_a_utf8_byte_order_mark(tmp_path):
    _frame(tmp_path, "a")
    (tmp_path / "index.csv").write_bytes(b"\xef\xbb\xbfa_colors.png,a_depth.png\n")
    dataset = load_depth_dataset(tmp_path, "test")
    assert dataset[0]["name"] == "a_colors" and dataset[0]["depth"][0, 0] == pytest.approx(1.5)


def test_csv_and_bts_list_with_crlf_line_endings(tmp_path):
    _frame(tmp_path, "a", 1500)
    _frame(tmp_path, "b", 2500)
    (tmp_path / "index.csv").write_bytes(b"rgb,depth\r\na_colors.png,a_depth.png\r\nb_colors.png,b_depth.png\r\n")
    assert [e["depth"][0, 0] for e in load_depth_dataset(tmp_path, "test")] == pytest.approx([1.5, 2.5])
    bts = tmp_path / "bts"
    bts.mkdir()
    (bts / "nyudepthv2_test_files_with_gt.txt").write_bytes(
        b"/a_colors.png /a_depth.png 518.8579\r\n\r\nb_colors.png b_depth.png 518.8579\r\n"
    )
    dataset = load_depth_dataset(bts / "nyudepthv2_test_files_with_gt.txt", data_root=tmp_path)
    assert [e["name"] for e in dataset] == ["a_colors", "b_colors"]


def test_csv_with_absolute_paths(tmp_path):
    rgb, depth = _frame(tmp_path / "elsewhere" / "frames", "a", 2000)
    listing = tmp_path / "lists"
    listing.mkdir()
    (listing / "nyu2_test.csv").write_text(f"{rgb},{depth}\n")
    example = load_depth_dataset(listing, "test")[0]
    assert example["depth"][0, 0] == pytest.approx(2.0)
    np.testing.assert_array_equal(np.asarray(example["image"]), np.full((3, 4, 3), 90, np.uint8))


def test_csv_paths_relative_to_the_csv_and_to_a_data_root(tmp_path):
    # relative to the CSV's folder, with ./ and ../ segments
    _frame(tmp_path / "shared" / "frames", "a", 1000)
    lists = tmp_path / "shared" / "lists"
    lists.mkdir()
    (lists / "index.csv").write_text("../frames/a_colors.png,./../frames/a_depth.png\n")
    assert load_depth_dataset(lists / "index.csv")[0]["depth"][0, 0] == pytest.approx(1.0)
    # relative to a data root that is neither the CSV's folder nor its parent
    _frame(tmp_path / "root" / "nyu2_test", "b", 3000)
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "nyu2_test.csv").write_text("nyu2_test/b_colors.png,nyu2_test/b_depth.png\n")
    with pytest.raises(FileNotFoundError, match=r"nyu2_test/b_colors\.png"):
        load_depth_dataset(tmp_path / "csvs", "test")
    dataset = load_depth_dataset(tmp_path / "csvs", "test", data_root=tmp_path / "root")
    assert dataset[0]["depth"][0, 0] == pytest.approx(3.0) and dataset[0]["name"] == "nyu2_test/b_colors"


def test_every_missing_file_is_named_in_one_error(tmp_path):
    _frame(tmp_path, "a")
    (tmp_path / "index.csv").write_text(
        "a_colors.png,a_depth.png\nmissing1_colors.png,a_depth.png\na_colors.png,missing2_depth.png\n"
    )
    with pytest.raises(FileNotFoundError) as info:
        load_depth_dataset(tmp_path, "test")
    message = str(info.value)
    assert "index.csv: 2 listed file(s) not found" in message
    assert "line 2: missing1_colors.png" in message and "line 3: missing2_depth.png" in message


def test_unreadable_frames_are_named_when_read(tmp_path):
    _frame(tmp_path, "a")
    (tmp_path / "broken_depth.png").write_bytes(b"not a png")
    (tmp_path / "index.csv").write_text("a_colors.png,broken_depth.png\n")
    dataset = load_depth_dataset(tmp_path, "test")
    with pytest.raises(OSError, match="broken_depth.png"):
        dataset[0]


def test_a_truncated_depth_png_is_named_when_its_frame_is_read(tmp_path):
    _frame(tmp_path, "a")
    rgb = tmp_path / "b_colors.png"
    depth = tmp_path / "b_depth.png"
    noise = np.random.default_rng(0).integers(500, 5000, (64, 80), dtype=np.uint16)  # noise: the cut reaches pixels
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(rgb)
    Image.fromarray(noise).save(depth)
    depth.write_bytes(depth.read_bytes()[: depth.stat().st_size // 2])
    (tmp_path / "index.csv").write_text("a_colors.png,a_depth.png\nb_colors.png,b_depth.png\n")
    dataset = load_depth_dataset(tmp_path, "test")
    assert dataset[0]["depth"][0, 0] == pytest.approx(1.5)  # the good frame still reads
    with pytest.raises(OSError, match=rf"cannot read image {depth}: .*truncated"):
        dataset[1]
    with pytest.raises(OSError, match=str(depth)):
        list(dataset)


@pytest.mark.parametrize(
    "line, fields",
    [("a_colors.png a_depth.png 518.8579 extra", 4), ("my photo.png a_depth.png 518.8579", 4),
     ("my photo.png a_depth.png", 3)],
)
def test_a_bts_line_with_more_fields_than_the_format_is_reported_with_its_line_number(tmp_path, line, fields):
    _frame(tmp_path, "a")
    listing = tmp_path / "nyudepthv2_test_files_with_gt.txt"
    listing.write_text(f"a_colors.png a_depth.png 518.8579\n{line}\n")
    with pytest.raises(ValueError) as info:
        load_depth_dataset(listing, data_root=tmp_path)
    message = str(info.value)
    assert f"{listing}:2: line does not fit the format 'rgb depth [focal]'" in message
    assert f"got {fields} field(s)" in message and "not found" not in message
