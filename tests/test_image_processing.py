import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_moa_depthclip import ImageLoadError, MoADepthCLIPImageProcessor, load_image_file
from modeling_moa_depthclip.image_processing_moa_depthclip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tiny_models import tiny_processor

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def unnormalize(pixel_values):
    return pixel_values * STD + MEAN


def gradient_rgb(height=48, width=40):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16", "I", "F", "P", "CMYK", "1", "YCbCr"])
def test_every_pil_mode_becomes_a_normalised_rgb_batch(mode):
    image = Image.fromarray(gradient_rgb())
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L")).astype(np.uint16) * 257))
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    pixel_values = tiny_processor()(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64) and pixel_values.dtype == torch.float32
    rgb = unnormalize(pixel_values[0])
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


def test_greyscale_modes_agree_with_the_same_picture_in_rgb():
    grey = Image.fromarray(gradient_rgb()[..., 0])
    processor = tiny_processor()
    reference = processor(grey.convert("RGB"))["pixel_values"]
    assert torch.allclose(processor(grey)["pixel_values"], reference, atol=1e-5)
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert torch.allclose(processor(sixteen)["pixel_values"], reference, atol=1e-4)


def test_transparent_pixels_are_composited_over_white():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black
    out = tiny_processor(do_resize=False, size={"height": 32, "width": 32})(Image.fromarray(rgba, "RGBA"))
    assert torch.allclose(unnormalize(out["pixel_values"][0]), torch.ones(3, 32, 32), atol=1e-5)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(gradient_rgb(32, 64))  # 64 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    opened = Image.open(path)
    processor = tiny_processor(do_resize=False)
    assert processor(opened)["pixel_values"].shape == (1, 3, 64, 32)
    assert load_image_file(path).size == (32, 64)


def test_numpy_torch_and_pil_inputs_agree():
    array = gradient_rgb()
    processor = tiny_processor()
    reference = processor(Image.fromarray(array))["pixel_values"]
    variants = [
        array,
        np.moveaxis(array, -1, 0),
        array.astype(np.float32) / 255.0,
        torch.from_numpy(np.moveaxis(array, -1, 0).copy()),
        torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1),
    ]
    for variant in variants:
        assert torch.allclose(processor(variant)["pixel_values"], reference, atol=1e-5)


def test_batches_of_mixed_sizes_and_known_normalisation():
    processor = tiny_processor()
    grey = np.full((40, 30, 3), 128, dtype=np.uint8)
    batch = processor([Image.fromarray(gradient_rgb()), grey, Image.fromarray(gradient_rgb(100, 20))])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    expected = ((128 / 255) - MEAN) / STD
    assert torch.allclose(batch["pixel_values"][1], expected.expand(3, 64, 64), atol=1e-5)
    assert processor(grey, return_tensors="np")["pixel_values"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 1, 3), dtype=np.uint8), "1x1 pixels"),
        (np.full((16, 16, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((16, 16, 2), dtype=np.uint8), "not an image"),
        (np.zeros((16, 16, 3), dtype=np.int64), "dtype int64"),
        (42, "unsupported image type int"),
        ("no/such/picture.png", "no/such/picture.png: no such file"),
        (np.full((16, 16), 300.0, dtype=np.float32), r"\[0, 1\]"),
    ],
)
def test_bad_arrays_get_one_clear_error(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_processor()(bad)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of size_divisor=32"):
        MoADepthCLIPImageProcessor(size={"height": 100, "width": 224})
    with pytest.raises(ValueError, match="resample"):
        MoADepthCLIPImageProcessor(resample="lanczos")


def test_post_process_resizes_depth_to_the_original_size():
    processor = tiny_processor()
    depth = torch.full((2, 16, 16), 3.0)
    depth[1] = torch.linspace(1, 5, 16).view(1, 16).expand(16, 16)
    results = processor.post_process_depth_estimation({"predicted_depth": depth}, target_sizes=[(480, 640), (20, 10)])
    assert results[0]["predicted_depth"].shape == (480, 640)
    assert torch.allclose(results[0]["predicted_depth"], torch.tensor(3.0))
    assert results[1]["predicted_depth"].shape == (20, 10)
    assert 1.0 <= results[1]["predicted_depth"].min() and results[1]["predicted_depth"].max() <= 5.0
    unchanged = processor.post_process_depth_estimation({"predicted_depth": depth})
    assert torch.equal(unchanged[1]["predicted_depth"], depth[1])
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        processor.post_process_depth_estimation({"predicted_depth": depth[:1]}, target_sizes=[(4, 4), (4, 4)])


def test_save_and_load_through_auto_image_processor(tmp_path):
    processor = tiny_processor(resample="bilinear")
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MoADepthCLIPImageProcessor
    assert loaded.size == {"height": 64, "width": 64} and loaded.resample == "bilinear"
    image = Image.fromarray(gradient_rgb())
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_a_real_nyu_frame(nyu_sample_dir):
    image = load_image_file(nyu_sample_dir / "00000_colors.png")
    assert image.size == (640, 480)
    pixel_values = MoADepthCLIPImageProcessor()(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    nyu = MoADepthCLIPImageProcessor(size={"height": 480, "width": 640})(image)["pixel_values"]
    assert torch.allclose(unnormalize(nyu[0]), torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1).float(),
                          atol=1e-5)


def _png_bytes(size=(32, 32)):
    # noise does not compress, so cutting the file really cuts the pixel data
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_files_get_one_error_naming_them(tmp_path, monkeypatch):
    cases = {
        "missing.png": (None, "no such file"),
        "empty.png": (b"", "empty file"),
        "text.png": (b"this is not a picture\n", "not a readable image"),
        "truncated.png": (_png_bytes((64, 64))[:2000], "truncated or corrupt"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ImageLoadError) as error:
            load_image_file(path)
        assert str(path) in str(error.value) and reason in str(error.value)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bytes((64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is now over the limit
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image_file(bomb)
