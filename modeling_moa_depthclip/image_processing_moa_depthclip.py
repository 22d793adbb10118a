"""Image processor for MoA-DepthCLIP: any image in, CLIP-normalised pixels out; depth maps back to image size."""

import base64
import binascii
import io
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESAMPLE_MODES = ("bicubic", "bilinear", "nearest", "area")
MIN_IMAGE_SIDE = 8
EXIF_ORIENTATION = 0x0112


class ImageLoadError(ValueError):
    """An image file that cannot be used, with the reason and the file named in the message."""


URL_PREFIXES = ("http://", "https://")
DATA_URI_PREFIX = "data:image/"


def decode_image(source, name: str) -> Image.Image:
    """Fully decode an image from a path or a byte stream, EXIF orientation applied; one `ImageLoadError` naming
    `name` for every way it can fail. PIL's decompression-bomb warning is raised as an error: refused, not decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{name}: refused, larger than PIL's decompression-bomb limit ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{name}: truncated or corrupt image ({error})") from None
    return image


def load_image_file(path) -> Image.Image:
    """Open and fully decode an image file, turning every way it can fail into one `ImageLoadError` naming it.

    The picture keeps its mode (16-bit, alpha, palette, CMYK): `to_float_rgb` reads every mode by one rule."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageLoadError(f"{path}: is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    return decode_image(path, path)


def load_image_url(url: str, timeout: float | None = None) -> Image.Image:
    """Fetch an http(s) image with httpx (the client transformers' `load_image` uses) and decode it like a file,
    keeping its mode: transformers' `load_image` converts to 8-bit RGB, which clips 16-bit pictures and drops alpha."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ImageLoadError(f"{url}: cannot be fetched ({error})") from None
    if not response.content:
        raise ImageLoadError(f"{url}: empty response (0 bytes)")
    return decode_image(io.BytesIO(response.content), url)


def read_image(image, timeout: float | None = None):
    """The picture an entry point is given, decoded at full fidelity: local paths through `load_image_file`,
    http(s) URLs through `load_image_url`, `data:image/...;base64,` URIs decoded; PIL images, NumPy arrays and
    tensors are returned as they are (never modified)."""
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if isinstance(text, str) and text.startswith(URL_PREFIXES):
            return load_image_url(text, timeout=timeout)
        if isinstance(text, str) and text.startswith(DATA_URI_PREFIX):
            name = text[:40] + "..."
            try:
                data = base64.b64decode(text.split(",", 1)[1], validate=True)
            except (IndexError, binascii.Error):
                raise ImageLoadError(f"{name}: not a base64 data URI") from None
            return decode_image(io.BytesIO(data), name)
        return load_image_file(text)
    return image


def _float_range_scale(values: np.ndarray, what: str) -> float:
    """The value of full white for float pixels: 1 when they lie in [0, 1], 255 in (1, 255] (PIL's own scale for
    mode F, as `convert("F")` of an 8-bit image gives); anything else is refused."""
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0.0 or high > 255.0:
        raise ValueError(f"{what} values must lie in [0, 1] (or [0, 255] for PIL mode F), got [{low:.3g}, {high:.3g}]")
    return 1.0 if high <= 1.0 else 255.0


def _pil_to_float_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 RGB in [0, 1], `H x W x 3` (see `to_float_rgb`)."""
    image = ImageOps.exif_transpose(image)  # a new image: the caller's is not changed
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        gray = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16"):
            scale = 65535.0
        elif image.mode == "F":
            scale = _float_range_scale(gray, "mode F image")
        else:
            # 32-bit integers: 16-bit data (PIL opens 16-bit PGM/PPM as mode I) or 8-bit data (`convert("I")`)
            if gray.size and (gray.min() < 0 or gray.max() > 65535):
                raise ValueError(f"mode I image values must lie in [0, 65535], got [{gray.min():.0f}, {gray.max():.0f}]")
            scale = 65535.0 if gray.size and gray.max() > 255 else 255.0
        return np.repeat((gray / np.float32(scale))[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels over white, as transformers' convert_to_rgb does
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as error:
            raise ValueError(f"image mode {image.mode!r} cannot be read as RGB ({error})") from None
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def _array_to_float_rgb(array: np.ndarray) -> np.ndarray:
    """NumPy `HxW`, `HxWxC` or `CxHxW` (C in 1, 3, 4), uint8/uint16/float in [0, 1] -> float32 RGB `H x W x 3`."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image array of shape {array.shape} is not an image: expected HxW, HxWxC or CxHxW with C in (1, 3, 4)"
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)  # a copy: the caller's array is not changed
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(
                f"float image values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]; "
                "pass uint8 arrays for 0-255 data"
            )
    else:
        raise ValueError(f"image array dtype {array.dtype} is not supported: use uint8, uint16 or float in [0, 1]")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = np.clip(array[..., :3] * alpha + (1.0 - alpha), 0.0, 1.0)
    return array


def to_float_rgb(image, timeout: float | None = None) -> np.ndarray:
    """The one rule that reads a picture, for every entry point: float32 RGB in [0, 1], `H x W x 3`, a new array.

    - paths, http(s) URLs and `data:image/` URIs are read by `read_image`;
    - PIL images of any mode: EXIF orientation applied; RGBA, LA, PA and palette images with transparency
      composited over white; 16-bit greyscale (`I;16`) divided by 65535, mode `I` by 65535 when a value exceeds 255
      (16-bit PGM/PPM) else by 255; mode `F` as is in [0, 1], divided by 255 in (1, 255]; CMYK, YCbCr, palette
      and 1-bit through PIL's conversion to RGB;
    - NumPy arrays and torch tensors: `HxW`, `HxWxC` or `CxHxW` with C in (1, 3, 4); uint8 / 255, uint16 / 65535,
      float as is in [0, 1]; a fourth channel is alpha, composited over white.
    """
    image = read_image(image, timeout=timeout)
    if isinstance(image, Image.Image):
        return _pil_to_float_rgb(image)
    if isinstance(image, torch.Tensor):
        return _array_to_float_rgb(image.detach().cpu().numpy())
    if isinstance(image, np.ndarray):
        return _array_to_float_rgb(image)
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass a PIL image, a NumPy array, a tensor, a path or a URL"
    )


def to_rgb8_image(image, timeout: float | None = None) -> Image.Image:
    """`to_float_rgb` as an 8-bit RGB PIL image (for display, point colours and training data). An upright RGB PIL
    image is returned as it is, an 8-bit `HxWx3` array converted without a detour through floats."""
    if isinstance(image, Image.Image) and image.mode == "RGB" and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(image), "RGB")  # already 8-bit RGB: PIL copies it
    rgb = to_float_rgb(image, timeout=timeout)
    return Image.fromarray(np.rint(rgb * np.float32(255.0)).astype(np.uint8), "RGB")


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given: the list is empty")
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


class MoADepthCLIPImageProcessor(BaseImageProcessor):
    r"""
    Resizes any image to the model's input size and normalises it with CLIP's mean and std; resizes predicted depth
    back to the original image size.

    Reads every picture by `to_float_rgb`, the rule the pipeline, the CLI and the data loaders share: PIL images of
    any mode (EXIF orientation applied, alpha composited over white, 16-bit greyscale kept at full precision),
    NumPy arrays and torch tensors (HWC or CHW; uint8, uint16 or float in [0, 1]), paths and URLs, single or in
    batches of mixed sizes. No torchvision: resizing is `torch.nn.functional.interpolate` with antialiasing.

    Args:
        do_resize (`bool`, defaults to `True`)
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`):
            Model input size; both sides must be multiples of `size_divisor` (the ViT patch size).
        resample (`str`, defaults to `"bicubic"`): One of "bicubic", "bilinear", "nearest", "area".
        do_normalize (`bool`, defaults to `True`)
        image_mean, image_std (`list[float]`): CLIP's by default.
        size_divisor (`int`, defaults to 32)
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict | None = None,
        resample: str = "bicubic",
        do_normalize: bool = True,
        image_mean: list | None = None,
        image_std: list | None = None,
        size_divisor: int = 32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.resample = resample
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        self.size_divisor = size_divisor
        self._check_settings(self.size, self.resample)

    def _check_settings(self, size, resample):
        if set(size) != {"height", "width"}:
            raise ValueError(f"size must be a dict with exactly 'height' and 'width', got {size}")
        for side in ("height", "width"):
            value = size[side]
            if not isinstance(value, int) or value <= 0 or value % self.size_divisor:
                raise ValueError(
                    f"size[{side!r}] = {value!r} must be a positive multiple of size_divisor={self.size_divisor}"
                )
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {list(RESAMPLE_MODES)}, got {resample!r}")

    def preprocess(
        self,
        images,
        do_resize: bool | None = None,
        size: dict | None = None,
        resample: str | None = None,
        do_normalize: bool | None = None,
        image_mean: list | None = None,
        image_std: list | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Turn one image or a batch into `pixel_values` of shape `(batch, 3, height, width)`."""
        if kwargs:
            raise TypeError(f"unexpected arguments for {type(self).__name__}: {sorted(kwargs)}")
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else dict(size)
        resample = self.resample if resample is None else resample
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        mean = torch.tensor(self.image_mean if image_mean is None else image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std if image_std is None else image_std).view(3, 1, 1)
        self._check_settings(size, resample)

        processed = []
        for image in _flatten_images(images):
            rgb = to_float_rgb(image)
            if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
                raise ValueError(
                    f"image is {rgb.shape[0]}x{rgb.shape[1]} pixels; both sides must be at least {MIN_IMAGE_SIDE}"
                )
            pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
            if do_resize and tuple(pixels.shape[-2:]) != (size["height"], size["width"]):
                antialias = resample in ("bicubic", "bilinear")
                pixels = F.interpolate(
                    pixels[None], size=(size["height"], size["width"]), mode=resample, antialias=antialias
                )[0].clamp_(0.0, 1.0)
            if do_normalize:
                pixels = (pixels - mean) / std
            processed.append(pixels)
        shapes = {tuple(p.shape) for p in processed}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} cannot be batched with do_resize=False")
        pixel_values = torch.stack(processed)
        if return_tensors in ("np", "numpy"):
            pixel_values = pixel_values.numpy()
        elif return_tensors is None:
            pixel_values = list(pixel_values.numpy())
        elif return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(data={"pixel_values": pixel_values})

    def post_process_depth_estimation(self, outputs, target_sizes=None) -> list[dict[str, torch.Tensor]]:
        """Resize `outputs.predicted_depth` (metres) to each target `(height, width)` with bilinear interpolation.

        Returns one `{"predicted_depth": tensor of shape (height, width)}` per image; without `target_sizes` the
        depth stays at the model's output size. Where the outputs carry them, `depth_uncertainty` (metres) and
        `fusion_weight` (on the head's grid) are resized to the same size the same way and returned as
        `"uncertainty"` and `"fusion_weight"`.
        """
        predicted_depth = _output_field(outputs, "predicted_depth")
        if predicted_depth.dim() == 4 and predicted_depth.shape[1] == 1:
            predicted_depth = predicted_depth.squeeze(1)
        if predicted_depth.dim() != 3:
            raise ValueError(f"predicted_depth must be (batch, height, width), got {tuple(predicted_depth.shape)}")
        if target_sizes is not None and len(target_sizes) != len(predicted_depth):
            raise ValueError(
                f"got {len(target_sizes)} target sizes for a batch of {len(predicted_depth)} depth maps"
            )
        companions = {}
        for key, name in (("uncertainty", "depth_uncertainty"), ("fusion_weight", "fusion_weight")):
            value = _output_field(outputs, name)
            if value is not None:
                if value.dim() != 3 or len(value) != len(predicted_depth):
                    raise ValueError(
                        f"{name} must be (batch={len(predicted_depth)}, height, width), got {tuple(value.shape)}"
                    )
                companions[key] = value
        results = []
        for index, depth in enumerate(predicted_depth):
            target = tuple(int(s) for s in target_sizes[index]) if target_sizes is not None else tuple(depth.shape)
            result = {"predicted_depth": _resize_map(depth, target)}
            for key, values in companions.items():
                result[key] = _resize_map(values[index], target)
            results.append(result)
        return results


def _output_field(outputs, name):
    return outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)


def _resize_map(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One `(height, width)` map resized bilinearly (half-pixel centres), as the model upsamples its depth."""
    if tuple(values.shape) == tuple(size):
        return values
    return F.interpolate(values[None, None].float(), size=size, mode="bilinear")[0, 0]


__all__ = [
    "ImageLoadError",
    "decode_image",
    "MoADepthCLIPImageProcessor",
    "load_image_file",
    "load_image_url",
    "read_image",
    "to_float_rgb",
    "to_rgb8_image",
]
