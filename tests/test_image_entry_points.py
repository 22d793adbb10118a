"""One picture in every form users have it gives the same depth through every entry point: the image processor and
the model, the pipeline, the `moa-depthclip` CLI and the demo's prediction function."""

import importlib.util
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from modeling_moa_depthclip import MoADepthCLIPDepthEstimationPipeline
from modeling_moa_depthclip.cli.predict import main as cli_main
from modeling_moa_depthclip.data import render_synthetic_scene
from modeling_moa_depthclip.loading import load_model_and_processor

# the tiny random model's depths span only centimetres, so entry points must agree far inside the 1 cm a trained
# model is held to; reading a picture wrongly (alpha dropped, 16-bit clipped white) moves them by several times this
TOLERANCE = 1e-4
HEIGHT, WIDTH = 72, 96


def _png_rgb16(path, rgb16: np.ndarray):
    """A 16-bit RGB PNG (PIL cannot write one)."""
    height, width, _ = rgb16.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    rgb, _ = render_synthetic_scene(3, height=HEIGHT, width=WIDTH)
    return rgb


@pytest.fixture(scope="module")
def files(picture, tmp_path_factory):
    """The same picture saved in each mode; each name is unique, so the CLI writes one output per file."""
    folder = tmp_path_factory.mktemp("modes")
    grey = np.asarray(Image.fromarray(picture).convert("L"))
    alpha = np.tile(np.linspace(0, 255, WIDTH).astype(np.uint8), (HEIGHT, 1))
    paths = {}

    def save(name, image, **kwargs):
        paths[name] = folder / name
        image.save(paths[name], **kwargs)

    save("rgb8.png", Image.fromarray(picture))
    paths["rgb16.png"] = folder / "rgb16.png"
    _png_rgb16(paths["rgb16.png"], picture.astype(np.uint16) * 257)
    save("grey8.png", Image.fromarray(grey))
    save("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257))
    save("rgba.png", Image.fromarray(np.dstack([picture, alpha]), "RGBA"))
    save("la.png", Image.fromarray(np.dstack([grey, alpha]), "LA"))
    palette = Image.fromarray(picture).quantize(16)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the top-left colour is transparent
    save("palette.png", palette, transparency=palette.info["transparency"])
    save("cmyk.jpg", Image.fromarray(picture).convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    save("exif.jpg", Image.fromarray(picture), exif=exif, quality=95)
    return paths


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, processor = load_model_and_processor(str(checkpoint))
    depth_pipeline = MoADepthCLIPDepthEstimationPipeline(model=model, image_processor=processor, device="cpu")
    return model, processor, depth_pipeline


def processor_and_model(loaded, image) -> np.ndarray:
    model, processor, _ = loaded
    rgb = processor(image)  # the processor's own reading of the image, then the model
    height, width = _size(image)
    with torch.no_grad():
        outputs = model(**rgb)
    return processor.post_process_depth_estimation(outputs, [(height, width)])[0]["predicted_depth"].numpy()


def _size(image):
    from modeling_moa_depthclip.image_processing_moa_depthclip import to_float_rgb

    return to_float_rgb(image).shape[:2]


@pytest.fixture(scope="module")
def demo_predict(loaded, tmp_path_factory):
    pytest.importorskip("gradio", reason="gradio is in the test extra")
    spec = importlib.util.spec_from_file_location("moa_depthclip_demo_app_modes", REPO_ROOT / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app
    spec.loader.exec_module(app)
    page = app.DepthDemo(loaded[2], "tiny-test-model")
    return lambda path: page.predict(str(path), "auto", 60.0)[10]  # the depth map (the uncertainty outputs follow)


@pytest.fixture(scope="module")
def cli_depths(checkpoint, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out")
    assert cli_main(["predict", *map(str, files.values()), "--model", str(checkpoint), "--output-dir", str(out)]) == 0
    return {name: np.load(out / f"{path.stem}_depth.npy") for name, path in files.items()}


def _close(a, b, what):
    assert a.shape == b.shape, what
    difference = float(np.abs(a - b).max())
    assert difference <= TOLERANCE, f"{what}: depths differ by up to {difference:.4f} m"


@pytest.mark.parametrize(
    "name", ["rgb8.png", "rgb16.png", "grey16.png", "rgba.png", "la.png", "palette.png", "cmyk.jpg", "exif.jpg"]
)
def test_a_file_gives_one_depth_through_every_entry_point(name, files, loaded, cli_depths, demo_predict):
    from modeling_moa_depthclip import load_image_file

    path = files[name]
    image = load_image_file(path)
    reference = processor_and_model(loaded, image)
    depth_pipeline = loaded[2]
    _close(depth_pipeline(str(path))["metric_depth"], reference, f"{name}: pipeline(path)")
    _close(depth_pipeline(image)["metric_depth"], reference, f"{name}: pipeline(PIL image)")
    _close(cli_depths[name], reference, f"{name}: CLI")
    _close(demo_predict(path), reference, f"{name}: demo")
    expected_size = (WIDTH, HEIGHT) if name != "exif.jpg" else (HEIGHT, WIDTH)  # EXIF rotation applied
    assert reference.shape == expected_size[::-1]


def test_sixteen_bit_pictures_give_the_depth_of_their_eight_bit_copy(files, loaded, cli_depths, demo_predict):
    depth_pipeline = loaded[2]
    for sixteen, eight in (("grey16.png", "grey8.png"), ("rgb16.png", "rgb8.png")):
        _close(depth_pipeline(str(files[sixteen]))["metric_depth"], depth_pipeline(str(files[eight]))["metric_depth"],
               f"pipeline {sixteen} vs {eight}")  # fmt: skip
        _close(cli_depths[sixteen], cli_depths[eight], f"CLI {sixteen} vs {eight}")
        _close(demo_predict(files[sixteen]), demo_predict(files[eight]), f"demo {sixteen} vs {eight}")
    # the test can fail: 8-bit RGB conversion (transformers' load_image) turns the 16-bit picture white
    clipped = Image.open(files["grey16.png"]).convert("RGB")
    assert np.asarray(clipped).min() == 255
    white = depth_pipeline(clipped)["metric_depth"]
    assert np.abs(white - cli_depths["grey8.png"]).max() > 10 * TOLERANCE


def test_alpha_is_composited_over_white_not_dropped(files, loaded, cli_depths):
    rgba = Image.open(files["rgba.png"])
    array = np.asarray(rgba).astype(np.float32) / 255.0
    composited = array[..., :3] * array[..., 3:] + (1.0 - array[..., 3:])
    _close(cli_depths["rgba.png"], processor_and_model(loaded, composited), "RGBA as documented")
    dropped = loaded[2](rgba.convert("RGB"))["metric_depth"]
    assert np.abs(dropped - cli_depths["rgba.png"]).max() > 10 * TOLERANCE  # dropping alpha would be caught


def test_arrays_and_tensors_give_the_depth_of_the_file(picture, loaded, cli_depths):
    depth_pipeline = loaded[2]
    in_memory = {
        "uint8 HWC array": picture,
        "float32 HWC array": picture.astype(np.float32) / 255.0,
        "uint8 CHW array": np.ascontiguousarray(np.moveaxis(picture, -1, 0)),
        "float CHW tensor": torch.from_numpy(picture).permute(2, 0, 1).float() / 255.0,
        "uint8 HWC tensor": torch.from_numpy(picture.copy()),
    }
    for what, image in in_memory.items():
        reference = processor_and_model(loaded, image)
        _close(reference, cli_depths["rgb8.png"], f"{what}: processor and model vs the PNG through the CLI")
        _close(depth_pipeline(image)["metric_depth"], reference, f"{what}: pipeline")
    batch = depth_pipeline([picture, picture.astype(np.float32) / 255.0], batch_size=2)
    _close(batch[0]["metric_depth"], batch[1]["metric_depth"], "a batch of arrays")


def test_the_users_objects_are_not_modified(picture, loaded, files):
    from modeling_moa_depthclip import load_image_file

    model, processor, depth_pipeline = loaded
    rgba = np.dstack([picture, np.full(picture.shape[:2], 128, np.uint8)])
    floats = picture.astype(np.float32) / 255.0
    tensor = torch.from_numpy(floats).permute(2, 0, 1)
    images = [load_image_file(files[name]) for name in ("rgba.png", "grey16.png", "palette.png", "exif.jpg")]
    before = [rgba.copy(), floats.copy(), tensor.clone()]
    pil_before = [(image.mode, image.size, image.tobytes(), dict(image.info), dict(image.getexif())) for image in images]
    for image in (rgba, floats, tensor, *images):
        processor(image)
        depth_pipeline(image)
    np.testing.assert_array_equal(rgba, before[0])
    np.testing.assert_array_equal(floats, before[1])
    assert torch.equal(tensor, before[2])
    assert [(i.mode, i.size, i.tobytes(), dict(i.info), dict(i.getexif())) for i in images] == pil_before


def test_the_data_loaders_and_the_torch_free_onnx_path_read_pictures_by_the_same_rule(files, picture):
    from conversion.onnx_inference import pil_to_float_rgb
    from modeling_moa_depthclip import load_image_file
    from modeling_moa_depthclip.data.reading import read_rgb_image
    from modeling_moa_depthclip.image_processing_moa_depthclip import to_float_rgb, to_rgb8_image

    grey = np.asarray(Image.fromarray(picture).convert("L"))
    in_memory = {
        "I (16-bit PGM)": Image.fromarray(grey.astype(np.int32) * 257, "I"),
        "I (8-bit)": Image.fromarray(grey).convert("I"),
        "F in [0, 1]": Image.fromarray(grey.astype(np.float32) / 255.0, "F"),
        "F in [0, 255]": Image.fromarray(grey).convert("F"),
        "1": Image.fromarray(picture).convert("1"),
        "YCbCr": Image.fromarray(picture).convert("YCbCr"),
    }
    images = {name: load_image_file(path) for name, path in files.items()} | in_memory
    for name, image in images.items():
        expected = to_float_rgb(image)
        np.testing.assert_allclose(pil_to_float_rgb(image), expected, atol=1e-6, err_msg=name)
        if name in files:  # what training and evaluation see: the same picture in 8 bits
            np.testing.assert_allclose(np.asarray(read_rgb_image(files[name])) / 255.0, expected, atol=0.5 / 255 + 1e-6,
                                       err_msg=name)  # fmt: skip
    # greyscale pictures in every integer and float mode are the same picture
    for name in ("I (16-bit PGM)", "I (8-bit)", "F in [0, 1]", "F in [0, 255]"):
        np.testing.assert_allclose(to_float_rgb(images[name])[..., 0], grey / 255.0, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(to_rgb8_image(images["grey16.png"])), np.asarray(
        Image.fromarray(grey).convert("RGB")))  # fmt: skip


def test_urls_and_data_uris_are_read_like_files(files, loaded):
    import base64
    import functools
    import http.server
    import socket
    import threading

    from modeling_moa_depthclip import ImageLoadError

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files["grey16.png"].parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    depth_pipeline = loaded[2]
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("grey16.png", "rgba.png"):
            from_file = depth_pipeline(str(files[name]))["metric_depth"]
            _close(depth_pipeline(f"{base}/{name}")["metric_depth"], from_file, f"{name} by URL")
        with pytest.raises(ImageLoadError, match=rf"{base}/missing.png: cannot be fetched .*404"):
            depth_pipeline(f"{base}/missing.png")
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/room.png"
    with pytest.raises(ImageLoadError, match=f"{closed}: cannot be fetched"):
        depth_pipeline(closed, timeout=5)
    uri = "data:image/png;base64," + base64.b64encode(files["grey16.png"].read_bytes()).decode()
    _close(depth_pipeline(uri)["metric_depth"], depth_pipeline(str(files["grey16.png"]))["metric_depth"], "data URI")
