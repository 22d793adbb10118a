"""`moa-depthclip` command line: metric depth for image files.

    moa-depthclip predict IMAGE... --model PATH_OR_HUB_ID --output-dir DIR [--overwrite]
                          [--point-cloud [--fov DEG | --intrinsics nyu|fx,fy,cx,cy]]

Per image it writes `<stem>_depth.png` (uint16, millimetres: the NYU convention), `<stem>_depth.npy` (float32,
metres) and `<stem>_depth_color.png` (Turbo colour map, near is red); with `--point-cloud` also `<stem>_points.ply`
(coloured points in metres). A bad image is reported in one line and skipped; the others are still processed.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .image_processing_moa_depthclip import ImageLoadError, load_image_file
from .point_cloud import DEFAULT_HFOV_DEG, depth_to_point_cloud, parse_intrinsics, resolve_intrinsics, write_ply
from .visualization import colorize_depth


OUTPUT_SUFFIXES = ("_depth.png", "_depth.npy", "_depth_color.png")
POINT_CLOUD_SUFFIX = "_points.ply"


def _fail(message: str, code: int = 2):
    print(f"moa-depthclip: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_depth_pipeline(model: str, device: str | None = None):
    """The depth-estimation pipeline for a local folder or Hub id, or one clear error if it cannot load."""
    import torch
    from transformers import pipeline

    from .evaluation import ModelLoadError, load_model_and_processor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        depth_model, image_processor = load_model_and_processor(model)
    except ModelLoadError as error:
        _fail(str(error))
    return pipeline("depth-estimation", model=depth_model, image_processor=image_processor, device=device)


def depth_to_millimetres_png(depth_metres: np.ndarray) -> Image.Image:
    """uint16 PNG in millimetres; values beyond 65.535 m saturate, invalid values become 0."""
    millimetres = np.nan_to_num(depth_metres * 1000.0, nan=0.0, posinf=0.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(millimetres), 0, 65535).astype(np.uint16))


def predict(args) -> int:
    if (args.fov is not None or args.intrinsics is not None) and not args.point_cloud:
        _fail("--fov and --intrinsics describe the camera for --point-cloud; add --point-cloud")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    depth_pipeline = load_depth_pipeline(args.model, args.device)
    failures = 0
    stems_seen = set()
    for image_path in args.images:
        stem = Path(image_path).stem
        targets = [output_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]
        if args.point_cloud:
            targets.append(output_dir / f"{stem}{POINT_CLOUD_SUFFIX}")
        if stem in stems_seen:
            print(f"moa-depthclip: error: {image_path}: another input has the same name {stem!r}; skipped",
                  file=sys.stderr)
            failures += 1
            continue
        stems_seen.add(stem)
        existing = [str(t) for t in targets if t.exists()]
        if existing and not args.overwrite:
            print(f"moa-depthclip: error: {existing[0]} exists (pass --overwrite to replace it); "
                  f"skipped {image_path}", file=sys.stderr)
            failures += 1
            continue
        try:
            image = load_image_file(image_path)
        except ImageLoadError as error:
            print(f"moa-depthclip: error: {error}", file=sys.stderr)
            failures += 1
            continue
        depth = depth_pipeline(image)["metric_depth"]
        depth_to_millimetres_png(depth).save(targets[0])
        np.save(targets[1], depth.astype(np.float32))
        colorize_depth(depth).save(targets[2])
        print(f"{image_path}: depth {depth.min():.2f}-{depth.max():.2f} m -> {targets[0]}")
        if args.point_cloud:
            write_point_cloud(image, depth, targets[3], fov=args.fov, intrinsics=args.intrinsics)
    return 1 if failures else 0


def write_point_cloud(image, depth: np.ndarray, path, *, fov=None, intrinsics=None) -> None:
    """The image's coloured points as binary PLY; the camera as `resolve_intrinsics` picks it (EXIF by default)."""
    height, width = depth.shape
    camera, source = resolve_intrinsics(width, height, intrinsics=intrinsics, fov_deg=fov, image=image)
    cloud = depth_to_point_cloud(depth, camera, image)
    write_ply(path, cloud)
    print(f"  {len(cloud)} points ({source}) -> {path}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa-depthclip", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict_parser = commands.add_parser("predict", help="predict metric depth for image files")
    predict_parser.add_argument("images", nargs="+", help="image files")
    predict_parser.add_argument("--model", required=True, help="saved model folder or Hugging Face Hub id")
    predict_parser.add_argument("--output-dir", required=True, help="folder for the depth files")
    predict_parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
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
    predict_parser.set_defaults(func=predict)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
