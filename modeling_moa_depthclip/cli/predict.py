"""`moa-depthclip` command line: metric depth for image files and folders of images.

    moa-depthclip predict IMAGE_OR_FOLDER... --model PATH_OR_HUB_ID --output-dir DIR [--overwrite]
                          [--batch-size N] [--dtype float32|bfloat16|float16|int8] [--device DEVICE]
                          [--point-cloud [--fov DEG | --intrinsics nyu|fx,fy,cx,cy]] [--uncertainty]
    moa-depthclip --version

Per image it writes `<stem>_depth.png` (uint16, millimetres: the NYU convention), `<stem>_depth.npy` (float32,
metres) and `<stem>_depth_color.png` (Turbo colour map, near is red); with `--point-cloud` also `<stem>_points.ply`
(coloured points in metres); with `--uncertainty` also `<stem>_uncertainty.npy` (float32, metres: the standard
deviation of the model's per-pixel depth-bin distribution) and `<stem>_uncertainty.png` (colour-mapped, with a colour
bar in metres); a model without depth bins says so in one line and writes neither. A folder stands for its image files, sorted by name; its `X_depth.*` files beside
`X_colors.*` (a dataset's ground truth, as in NYU Depth V2 folders) are skipped with one line saying so.

Everything that can be checked is checked before the model is loaded: option combinations, outputs that exist,
name clashes and every input image (decoded once). A bad image is reported in one line and skipped; the others
are still processed. An image with one 16-bit channel is named in a warning: it looks like a depth map, not a
photograph. A model that cannot be loaded is one line naming it and why.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from .arguments import positive_int
from ..image_processing_moa_depthclip import ImageLoadError, load_image_file
from ..loading import ModelLoadError, load_config
from ..geometry.point_cloud import DEFAULT_HFOV_DEG, depth_to_point_cloud, parse_intrinsics, resolve_intrinsics, write_ply
from ..quantization import INFERENCE_DTYPES, QuantizationUnavailableError, load_depth_pipeline as load_pipeline
from ..uncertainty import has_depth_bins
from ..visualization import colorize_depth, uncertainty_figure


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DTYPES = INFERENCE_DTYPES
POINT_CLOUD_SUFFIX = "_points.ply"
UNCERTAINTY_SUFFIXES = ("_uncertainty.npy", "_uncertainty.png")


def _fail(message: str, code: int = 2):
    print(f"moa-depthclip: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _report(message: str):
    print(f"moa-depthclip: error: {message}", file=sys.stderr)


def _note(message: str, kind: str = "note"):
    print(f"moa-depthclip: {kind}: {message}", file=sys.stderr)


def load_depth_pipeline(model: str, device: str | None = None, dtype: str | None = None):
    """The MoA-DepthCLIP depth pipeline on a saved model (local folder or Hub id) in `dtype` (one of `DTYPES`; int8:
    onnxruntime's int8 quantisation, exported once and cached). Raises `ModelLoadError` (one line naming the folder
    or file and the reason), `QuantizationUnavailableError`, or `ValueError` for a dtype the device cannot run."""
    return load_pipeline(model, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------------------------
# outputs: one writer per kind, each `(path, image, values, args)`; `values` is the pipeline result's `Output.key`


def depth_to_millimetres_png(depth_metres: np.ndarray) -> Image.Image:
    """uint16 PNG in millimetres; values beyond 65.535 m saturate, invalid values become 0."""
    millimetres = np.nan_to_num(depth_metres * 1000.0, nan=0.0, posinf=0.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(millimetres), 0, 65535).astype(np.uint16))


def write_millimetre_png(path, image, depth, args):
    depth_to_millimetres_png(depth).save(path)


def write_metre_npy(path, image, depth, args):
    np.save(path, depth.astype(np.float32))


def write_colour_png(path, image, depth, args):
    colorize_depth(depth).save(path)


def write_point_cloud(image, depth: np.ndarray, path, *, fov=None, intrinsics=None) -> None:
    """The image's coloured points as binary PLY; the camera as `resolve_intrinsics` picks it (EXIF by default)."""
    height, width = depth.shape
    camera, source = resolve_intrinsics(width, height, intrinsics=intrinsics, fov_deg=fov, image=image)
    cloud = depth_to_point_cloud(depth, camera, image)
    write_ply(path, cloud)
    print(f"  {len(cloud)} points ({source}) -> {path}")


def write_point_cloud_ply(path, image, depth, args):
    write_point_cloud(image, depth, path, fov=args.fov, intrinsics=args.intrinsics)


def write_uncertainty_png(path, image, uncertainty, args):
    uncertainty_figure(uncertainty).save(path)


class Output(NamedTuple):
    suffix: str
    write: Callable
    key: str = "metric_depth"


# every run writes these; options add theirs in `outputs_for`
DEPTH_OUTPUTS = (
    Output("_depth.png", write_millimetre_png),
    Output("_depth.npy", write_metre_npy),
    Output("_depth_color.png", write_colour_png),
)
OUTPUT_SUFFIXES = tuple(output.suffix for output in DEPTH_OUTPUTS)


UNCERTAINTY_OUTPUTS = (
    Output(UNCERTAINTY_SUFFIXES[0], write_metre_npy, "uncertainty"),
    Output(UNCERTAINTY_SUFFIXES[1], write_uncertainty_png, "uncertainty"),
)


def outputs_for(args, config=None) -> list[Output]:
    """What each image gets; `--uncertainty` adds its files only for a model (`config`) with depth bins."""
    outputs = list(DEPTH_OUTPUTS)
    if args.point_cloud:
        outputs.append(Output(POINT_CLOUD_SUFFIX, write_point_cloud_ply))
    if getattr(args, "uncertainty", False) and (config is None or has_depth_bins(config)):
        outputs.extend(UNCERTAINTY_OUTPUTS)
    return outputs


# --------------------------------------------------------------------------------------------------------------------
# inputs


def _ground_truth_depth_files(images: list[Path]) -> set[Path]:
    """`X_depth.*` files beside an `X_colors.*` file: a dataset's depth maps next to its photographs."""
    photographed = {image.stem[: -len("_colors")] for image in images if image.stem.endswith("_colors")}
    return {image for image in images if image.stem.endswith("_depth") and image.stem[: -len("_depth")] in photographed}


def expand_inputs(inputs: list[str], output_dir: Path, output_suffixes) -> tuple[list[str], int]:
    """Files as given and folders as their image files sorted by name; returns the paths and how many inputs failed.

    Files this command wrote into an input folder (when it is also the output folder) are not inputs, and neither
    are ground-truth `X_depth.*` files beside `X_colors.*` photographs (one line says how many were skipped)."""
    paths, failures = [], 0
    for entry in inputs:
        folder = Path(entry)
        if not folder.is_dir():
            paths.append(entry)  # a missing or unreadable file is reported when it is checked
            continue
        own_outputs = folder.resolve() == output_dir.resolve()
        images = sorted(
            child for child in folder.iterdir()
            if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES
            and not (own_outputs and child.name.endswith(tuple(output_suffixes)))
        )
        ground_truth = _ground_truth_depth_files(images)
        if ground_truth:
            _note(f"{entry}: skipped {len(ground_truth)} *_depth.* file(s) beside *_colors.* photographs "
                  "(ground-truth depth maps, not photographs)")  # fmt: skip
            images = [image for image in images if image not in ground_truth]
        if not images:
            _report(f"folder {entry} has no image files ({', '.join(IMAGE_SUFFIXES)})")
            failures += 1
        paths.extend(str(image) for image in images)
    return paths, failures


def looks_like_depth_map(image: Image.Image) -> bool:
    """One 16-bit channel: how depth sensors and datasets store depth (millimetres), rarely a photograph."""
    if image.mode.startswith("I;16"):
        return True
    return image.mode == "I" and image.getextrema()[1] > 255  # PIL opens 16-bit PGM as mode I


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------------------------------
# predict


def plan_outputs(paths: list[str], output_dir: Path, outputs, overwrite: bool) -> tuple[list, int]:
    """`[(image path, output paths)]` to write and how many inputs were refused: a name another input has, or an
    output that exists without `overwrite` (the user's file is kept)."""
    planned, failures, stems_seen = [], 0, set()
    for image_path in paths:
        stem = Path(image_path).stem
        targets = [output_dir / f"{stem}{output.suffix}" for output in outputs]
        if stem in stems_seen:
            _report(f"{image_path}: another input has the same name {stem!r}; skipped")
            failures += 1
            continue
        stems_seen.add(stem)
        existing = [str(t) for t in targets if t.exists()]
        if existing and not overwrite:
            _report(f"{existing[0]} exists (pass --overwrite to replace it); skipped {image_path}")
            failures += 1
            continue
        planned.append((image_path, targets))
    return planned, failures


def check_inputs(planned: list) -> tuple[list, int]:
    """The planned images that decode, each opened once before the model is loaded; a bad one is one line."""
    readable, failures = [], 0
    for image_path, targets in planned:
        try:
            image = load_image_file(image_path)
        except ImageLoadError as error:
            _report(str(error))
            failures += 1
            continue
        if looks_like_depth_map(image):
            _note(f"{image_path} has one 16-bit channel: it looks like a depth map, not a photograph "
                  "(predicting on it anyway)", kind="warning")  # fmt: skip
        readable.append((image_path, targets))
    return readable, failures


def predict(args) -> int:
    # everything that can be refused is refused before the model is loaded (a Hub id downloads first)
    if args.dtype == "int8" and args.device not in (None, "cpu"):
        _fail(f"--dtype int8 runs on the CPU (onnxruntime); drop --device {args.device}")
    if (args.fov is not None or args.intrinsics is not None) and not args.point_cloud:
        _fail("--fov and --intrinsics describe the camera for --point-cloud; add --point-cloud")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        _fail(f"--output-dir {output_dir} is a file, not a folder")
    config = None
    if args.uncertainty:  # whether the model has depth bins decides the outputs: its config alone, no weights
        config = load_config(args.model)
        if not has_depth_bins(config):
            _note(f"--uncertainty: {args.model} has no depth bins (head={config.head!r}), so no uncertainty; no "
                  "_uncertainty files are written")  # fmt: skip
    outputs = outputs_for(args, config)
    paths, failures = expand_inputs(args.images, output_dir, [output.suffix for output in outputs_for(args)])
    planned, refused = plan_outputs(paths, output_dir, outputs, args.overwrite)
    planned, unreadable = check_inputs(planned)
    failures += refused + unreadable
    if not planned:
        _note("nothing to predict; the model was not loaded")
        return 1

    depth_pipeline = load_depth_pipeline(args.model, args.device, args.dtype)  # main() reports a ModelLoadError
    output_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(planned), unit="image", disable=None, file=sys.stderr) as progress:
        for batch in _batches(planned, args.batch_size):
            loaded = []
            for image_path, targets in batch:
                try:  # checked above; a file changed since is still one line
                    loaded.append((image_path, targets, load_image_file(image_path)))
                except ImageLoadError as error:
                    _report(str(error))
                    failures += 1
                    progress.update(1)
            if not loaded:
                continue
            results = depth_pipeline([image for _, _, image in loaded], batch_size=args.batch_size)
            for (image_path, targets, image), result in zip(loaded, results):
                depth = result["metric_depth"]
                for output, target in zip(outputs, targets):
                    output.write(target, image, result[output.key], args)
                line = f"{image_path}: depth {depth.min():.2f}-{depth.max():.2f} m"
                if "uncertainty" in result and args.uncertainty:
                    line += f", uncertainty up to {result['uncertainty'].max():.2f} m"
                progress.write(f"{line} -> {targets[0]}")
                progress.update(1)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------------------------
# arguments


def _intrinsics_argument(text: str):
    try:
        return parse_intrinsics(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fov_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 180.0:
        raise argparse.ArgumentTypeError(f"field of view must be between 0 and 180 degrees, got {text!r}")
    return value


def _version() -> str:
    return f"moa-depthclip {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


class _VersionAction(argparse.Action):
    # imports torch only when asked
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa-depthclip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action=_VersionAction, help="print the versions and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    predict_parser = commands.add_parser("predict", help="predict metric depth for image files and folders")
    predict_parser.add_argument("images", nargs="+", help="image files, or folders of images (sorted by name)")
    predict_parser.add_argument("--model", required=True, help="saved model folder or Hugging Face Hub id")
    predict_parser.add_argument("--output-dir", required=True, help="folder for the depth files")
    predict_parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    predict_parser.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
    predict_parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="weights and activations (default: float32 as saved; bfloat16 is faster on recent CPUs and GPUs; int8: "
        "onnxruntime's int8 quantisation on CPU, the fastest there, depth within about 1 cm of float32; the first "
        "int8 run exports the model once, see BENCHMARKS.md)",
    )  # fmt: skip
    predict_parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    predict_parser.add_argument(
        "--point-cloud", action="store_true", help=f"also write <stem>{POINT_CLOUD_SUFFIX}, the coloured 3D points"
    )
    camera = predict_parser.add_mutually_exclusive_group()
    camera.add_argument(
        "--fov", type=_fov_argument, default=None, metavar="DEG",
        help="horizontal field of view for --point-cloud (default: from the EXIF 35 mm-equivalent focal length, "
        f"else NYU's {DEFAULT_HFOV_DEG:.1f})",
    )  # fmt: skip
    camera.add_argument(
        "--intrinsics", type=_intrinsics_argument, default=None, metavar="nyu|fx,fy,cx,cy",
        help="camera for --point-cloud: the NYU Depth V2 preset or pixels of the input image",
    )  # fmt: skip
    predict_parser.add_argument(
        "--uncertainty", action="store_true",
        help=f"also write <stem>{UNCERTAINTY_SUFFIXES[0]} (float32, metres: the spread of the model's depth bins) "
        f"and <stem>{UNCERTAINTY_SUFFIXES[1]} (with a colour bar in metres)",
    )  # fmt: skip
    predict_parser.set_defaults(func=predict)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, QuantizationUnavailableError) as error:
        _fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
