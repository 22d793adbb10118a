"""Image processor for MoA-DepthCLIP: any image in, CLIP-normalised pixels out; depth maps back to image size."""

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


class ImageLoadError(ValueError):
    """An image file that cannot be used, with the reason and the file named in the message."""


def load_image_file(path) -> Image.Image:
    """Open and fully decode an image file, turning every way it can fail into one `ImageLoadError` naming it.

    PIL's decompression-bomb warning is raised as an error too: an image that large is refused, not decoded.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageLoadError(f"{path}: is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{path}: refused, larger than PIL's decompression-bomb limit ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{path}: truncated or corrupt image ({error})") from None
    return image


def _pil_to_float_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 RGB in [0, 1], `H x W x 3`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # high-bit-depth greyscale: scale by the range its mode can hold, not to 8 bits first
        gray = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if image.mode.startswith("I;16") else max(float(gray.max()), 1.0)
        gray = np.clip(gray / scale, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels over white, as transformers' convert_to_rgb does
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


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
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
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
        array = array[..., :3] * alpha + (1.0 - alpha)
    return array


def to_float_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        array = _pil_to_float_rgb(image)
    elif isinstance(image, torch.Tensor):
        array = _array_to_float_rgb(image.detach().cpu().numpy())
    elif isinstance(image, np.ndarray):
        array = _array_to_float_rgb(image)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, a NumPy array or a tensor")
    height, width = array.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {height}x{width} pixels; both sides must be at least {MIN_IMAGE_SIDE}")
    return array


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

    Accepts PIL images of any mode (EXIF orientation applied, alpha composited over white, 16-bit greyscale kept at
    full precision), NumPy arrays and torch tensors (HWC or CHW; uint8, uint16 or float in [0, 1]), single or in
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
            pixels = torch.from_numpy(np.ascontiguousarray(to_float_rgb(image))).permute(2, 0, 1)
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


__all__ = ["MoADepthCLIPImageProcessor", "load_image_file", "ImageLoadError"]
