"""MoA-DepthCLIP in the browser: metric depth from one image, read in metres, downloaded, and seen in 3D.

    python demo/app.py --model PATH_OR_HUB_ID [--port N] [--host 127.0.0.1]

One Gradio page: upload an image or pick an example (NYU Depth V2 test frames when the shared sample is found,
rendered synthetic rooms); it shows the depth in colour with a colour bar in metres, an RGB / depth slider, the
minimum, median and maximum depth, the depth at a clicked point, the 3D point cloud, and downloads of the 16-bit PNG
(millimetres), the float32 .npy (metres) and the PLY point cloud; for a model with depth bins an Uncertainty tab shows
the spread of its per-pixel depth-bin distribution in metres (colour bar, reading at a clicked point, .npy download).
A new image (uploaded or an example clicked) runs the model at once and clears what was read from the previous one;
where the browser has no WebGL, the 3D tab says so and offers the PLY file. The API endpoint `/predict` takes the
image first, for `gradio_client`; the uncertainty picture and .npy come after the depth outputs. On a Hugging Face
Space the model is the card's `models:` entry (or `$MOA_DEPTHCLIP_MODEL`).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    import modeling_moa_depthclip  # noqa: F401  (installed, or copied next to this file on a Space)
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradio as gr

from modeling_moa_depthclip.cli.predict import DTYPES, depth_to_millimetres_png, load_depth_pipeline
from modeling_moa_depthclip.loading import ModelLoadError
from modeling_moa_depthclip.quantization import QuantizationUnavailableError
from modeling_moa_depthclip.data import NYU_HFOV_DEG, render_synthetic_scene
from modeling_moa_depthclip.image_processing_moa_depthclip import ImageLoadError, load_image_file, to_rgb8_image
from modeling_moa_depthclip.geometry.point_cloud import (
    DEFAULT_HFOV_DEG,
    NYU_INTRINSICS,
    depth_to_point_cloud,
    resolve_intrinsics,
    write_ply,
)
from modeling_moa_depthclip.uncertainty import has_depth_bins
from modeling_moa_depthclip.visualization import (
    colorize_depth,
    colorize_unit_depth,
    map_with_colour_bar,
    uncertainty_figure,
)

MODEL_ENV = "MOA_DEPTHCLIP_MODEL"
NYU_SAMPLE_ENV = "MOA_DEPTHCLIP_NYU_SAMPLE"
NYU_EXAMPLE_FRAMES = ("00000", "00014", "00046", "00116")
SYNTHETIC_EXAMPLE_SEEDS = (3, 11)
# the PLY download keeps full resolution up to a 640x480 frame; the in-page 3D view draws fewer points
MAX_PLY_POINTS = NYU_INTRINSICS.width * NYU_INTRINSICS.height
MAX_VIEW_POINTS = 80_000
OUTPUT_MAX_AGE_S = 2 * 3600
CLICK_PROMPT = "Estimate the depth first, then click the depth map."
UNCERTAINTY_CLICK_PROMPT = "Estimate the depth first, then click the uncertainty map."
# headless browsers and some machines have no WebGL: the 3D viewer would stay blank without a word
WEBGL_CHECK = """
const probe = document.createElement("canvas");
const webgl = !!(window.WebGLRenderingContext && (probe.getContext("webgl2") || probe.getContext("webgl")));
element.querySelector(".no-webgl").hidden = webgl;
const viewer = document.getElementById("point-cloud-view");
if (viewer && !webgl) viewer.style.display = "none";
"""
NO_WEBGL_NOTICE = (
    '<p class="no-webgl" hidden>This browser has no WebGL, so the 3D view cannot be drawn here. Download the point '
    "cloud below (PLY, metres) and open it in MeshLab, CloudCompare or Blender.</p>"
)
# the depth map's toolbar is switched off (`buttons=[]`), but Gradio still draws its empty corner over the map
PAGE_CSS = "#depth-figure .icon-button-wrapper:not(:has(button)) { display: none; }"
CAMERAS = [
    ("From the photo's EXIF focal length (else the default field of view)", "auto"),
    ("NYU Depth V2 camera (Kinect v1, 640x480)", "nyu"),
    ("Horizontal field of view below", "fov"),
]


def image_upload(**kwargs) -> gr.Image:
    """`gr.Image` whose unreadable uploads fail with one message naming the file (drawn by gr.Image's frontend).

    Its `preprocess` is wrapped on the instance: a subclass would make Gradio's component metaclass write an
    `app.pyi` stub beside this file at every start.
    """
    component = gr.Image(**kwargs)
    stock_preprocess = component.preprocess

    def preprocess(payload):
        try:
            return stock_preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            name = (payload.orig_name or Path(payload.path or "upload").name) if payload else "upload"
            raise gr.Error(f"{name}: not a readable image ({type(error).__name__}); upload a PNG, JPEG or WebP "
                           "photo") from None  # fmt: skip

    component.preprocess = preprocess
    return component


def find_nyu_sample() -> Path | None:
    """The shared NYU frames: $MOA_DEPTHCLIP_NYU_SAMPLE, else ../shared/data/nyu_eigen_test_sample of the repo."""
    env = os.environ.get(NYU_SAMPLE_ENV)
    folder = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data" / (
        "nyu_eigen_test_sample")  # fmt: skip
    return folder if folder.is_dir() else None


def depth_figure(depth: np.ndarray, vmin: float, vmax: float) -> Image.Image:
    """The coloured depth map (its own pixels, so clicks map to them) with a colour bar in metres on its right."""
    return map_with_colour_bar(depth, vmin, vmax, colorize_unit_depth)


def _colour_range(depth: np.ndarray) -> tuple[float, float]:
    finite = depth[np.isfinite(depth)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-2:  # a flat map still gets a readable colour bar
        low, high = max(low - 0.05, 0.0), high + 0.05
    return low, high


def _stride_for(height: int, width: int, max_points: int) -> int:
    return max(1, math.ceil(math.sqrt(height * width / max_points)))


class DepthDemo:
    """The page's logic around a depth-estimation pipeline; `build()` returns the Gradio Blocks."""

    def __init__(self, depth_pipeline, model_name: str, nyu_sample: Path | None = None):
        self.pipeline = depth_pipeline
        self.model_name = model_name
        config = depth_pipeline.model.config
        self.min_depth, self.max_depth = float(config.min_depth), float(config.max_depth)
        self._workdir = tempfile.TemporaryDirectory(prefix="moa-depthclip-demo-")
        self.root = Path(self._workdir.name)
        self.examples = self._examples(nyu_sample)

    # ------------------------------------------------------------------ examples

    def _examples(self, nyu_sample: Path | None) -> list[tuple[list, str]]:
        examples = []
        if nyu_sample is not None:
            for frame in NYU_EXAMPLE_FRAMES:
                path = nyu_sample / f"{frame}_colors.png"
                if path.is_file():
                    examples.append(([str(path), "nyu", NYU_INTRINSICS.horizontal_fov_deg], f"NYU test frame {frame}"))
        folder = self.root / "examples"
        folder.mkdir()
        for seed in SYNTHETIC_EXAMPLE_SEEDS:
            rgb, _ = render_synthetic_scene(seed)
            path = folder / f"synthetic_room_{seed}.png"
            Image.fromarray(rgb).save(path)
            # rendered through a centred pinhole with NYU's horizontal field of view
            examples.append(([str(path), "fov", NYU_HFOV_DEG], f"synthetic room (seed {seed})"))
        return examples

    # ------------------------------------------------------------------ inference

    def _output_folder(self) -> Path:
        now = time.time()
        for old in self.root.glob("request-*"):
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.root))

    def predict(self, image_path: str | None, camera: str = "auto", fov_deg: float = DEFAULT_HFOV_DEG):
        """Image file -> depth picture, slider pair, min/median/max (m), PNG/NPY/PLY files, 3D view, notes, depth,
        then uncertainty picture, uncertainty .npy file and uncertainty map (None without depth bins)."""
        if not image_path:
            raise gr.Error("No image: upload one or pick an example.")
        started = time.perf_counter()
        try:
            image = load_image_file(image_path)
        except ImageLoadError as error:
            raise gr.Error(str(error).replace(str(image_path), Path(image_path).name)) from None
        if camera not in {value for _, value in CAMERAS}:
            raise gr.Error(f"camera must be one of {[value for _, value in CAMERAS]}, got {camera!r}")
        # the pipeline reads the picture as decoded (16-bit, alpha); the slider and the points show what it saw
        result = self.pipeline(image)
        depth = result["metric_depth"]
        rgb = to_rgb8_image(image)
        model_seconds = time.perf_counter() - started

        height, width = depth.shape
        intrinsics, source = resolve_intrinsics(
            width, height, intrinsics="nyu" if camera == "nyu" else None,
            fov_deg=float(fov_deg) if camera == "fov" else None, image=image,
        )  # fmt: skip
        folder = self._output_folder()
        stem = Path(image_path).stem
        png_path, npy_path = folder / f"{stem}_depth.png", folder / f"{stem}_depth.npy"
        ply_path, view_path = folder / f"{stem}_points.ply", folder / f"{stem}_points_preview.ply"
        depth_to_millimetres_png(depth).save(png_path)
        np.save(npy_path, depth.astype(np.float32))
        cloud = depth_to_point_cloud(depth, intrinsics, rgb, stride=_stride_for(height, width, MAX_PLY_POINTS))
        write_ply(ply_path, cloud)
        view = depth_to_point_cloud(depth, intrinsics, rgb, stride=_stride_for(height, width, MAX_VIEW_POINTS))
        view.points *= np.array([1, -1, -1], dtype=np.float32)  # the viewer's axes: y up, the scene towards -z
        write_ply(view_path, view)

        vmin, vmax = _colour_range(depth)
        figure = depth_figure(depth, vmin, vmax)
        finite = depth[np.isfinite(depth)]
        low, median, high = (float(np.min(finite)), float(np.median(finite)), float(np.max(finite)))
        seconds = time.perf_counter() - started
        notes = (
            f"{width}x{height} px · model {model_seconds:.2f} s, all outputs {seconds:.2f} s · "
            f"point cloud: {len(cloud):,} points, camera: {source}"
        )
        print(f"predict {Path(image_path).name}: {width}x{height}, {model_seconds:.2f} s model, {seconds:.2f} s total",
              flush=True)  # fmt: skip
        return (
            figure,
            (rgb, colorize_depth(depth, vmin, vmax)),
            round(low, 3),
            round(median, 3),
            round(high, 3),
            str(png_path),
            str(npy_path),
            str(ply_path),
            str(view_path),
            notes,
            depth,
            *self._uncertainty_outputs(result.get("uncertainty"), folder, stem),
        )

    # `predict`'s outputs with nothing in them
    CLEARED = (None, None, None, None, None, None, None, None, None, "", None, None, None, None)

    def clear(self):
        """A new image (uploaded, an example, or removed): what was read from the previous one goes, the clicked
        point's depth with it."""
        return self.CLEARED + (CLICK_PROMPT, UNCERTAINTY_CLICK_PROMPT)

    def predict_new_image(self, image_path: str | None, camera: str = "auto", fov_deg: float = DEFAULT_HFOV_DEG):
        """`predict` for an image that just arrived; a removed image leaves the page cleared."""
        if not image_path:
            return self.CLEARED
        return self.predict(image_path, camera, fov_deg)

    @staticmethod
    def _uncertainty_outputs(uncertainty: np.ndarray | None, folder: Path, stem: str):
        """The Uncertainty tab's picture and .npy file, and the map for clicks; None for a model without bins."""
        if uncertainty is None:
            return None, None, None
        path = folder / f"{stem}_uncertainty.npy"
        np.save(path, uncertainty.astype(np.float32))
        return uncertainty_figure(uncertainty), str(path), uncertainty

    @staticmethod
    def uncertainty_at(uncertainty: np.ndarray | None, depth: np.ndarray | None, event: gr.SelectData) -> str:
        if uncertainty is None or depth is None:
            return UNCERTAINTY_CLICK_PROMPT
        x, y = (int(v) for v in event.index)
        height, width = uncertainty.shape
        if not (0 <= x < width and 0 <= y < height):
            return "Click on the uncertainty map itself (left of the colour bar)."
        return f"±{float(uncertainty[y, x]):.3f} m (depth {float(depth[y, x]):.3f} m) at pixel x={x}, y={y}"

    @staticmethod
    def depth_at(depth: np.ndarray | None, event: gr.SelectData) -> str:
        if depth is None:
            return CLICK_PROMPT
        x, y = (int(v) for v in event.index)
        height, width = depth.shape
        if not (0 <= x < width and 0 <= y < height):
            return "Click on the depth map itself (left of the colour bar)."
        return f"{float(depth[y, x]):.3f} m at pixel x={x}, y={y}"

    # ------------------------------------------------------------------ page

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="MoA-DepthCLIP · metric depth", delete_cache=(3600, OUTPUT_MAX_AGE_S)) as demo:
            gr.Markdown(
                "# MoA-DepthCLIP: metric depth from one image\n"
                f"Model `{self.model_name}` predicts depth in metres, from {self.min_depth:g} m to "
                f"{self.max_depth:g} m (its configuration). Upload a photo or pick an example; click the depth "
                "map to read the depth at a point."
            )
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=320):
                    image_input = image_upload(
                        label="Input image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                        height=300, elem_id="input-image",
                    )  # fmt: skip
                    with gr.Accordion("Camera for the 3D point cloud", open=False):
                        camera = gr.Radio(CAMERAS, value="auto", label="Intrinsics", elem_id="camera")
                        fov = gr.Slider(
                            20.0, 120.0, value=round(DEFAULT_HFOV_DEG, 1), step=0.1,
                            label="Horizontal field of view (degrees)", elem_id="fov",
                        )  # fmt: skip
                    run = gr.Button("Estimate depth", variant="primary", elem_id="run")
                    examples = gr.Examples(
                        examples=[row for row, _ in self.examples],
                        example_labels=[label for _, label in self.examples],
                        inputs=[image_input, camera, fov],
                        label="Examples: NYU Depth V2 test frames and rendered synthetic rooms",
                        examples_per_page=8,
                        visible_columns=[0],
                        cache_examples=False,
                    )  # fmt: skip
                with gr.Column(scale=3, min_width=300):
                    with gr.Tabs():
                        with gr.Tab("Depth"):
                            # the caption sits above the map: a label or toolbar drawn over it would hide its top
                            gr.Markdown("Depth in metres: near is red, far is blue. Click the map to read a point.",
                                        elem_id="depth-caption")  # fmt: skip
                            figure = gr.Image(
                                label="Depth (m)", show_label=False, buttons=[], type="pil", format="png",
                                interactive=False, elem_id="depth-figure",
                            )  # fmt: skip
                        with gr.Tab("Slider"):  # short names: all four tabs fit at phone width
                            slider = gr.ImageSlider(label="Drag the handle: RGB | depth", type="pil", format="png")
                        with gr.Tab("3D"):
                            view = gr.Model3D(
                                label="Point cloud (m): drag to orbit",
                                display_mode="point_cloud", clear_color=(0.1, 0.1, 0.12, 1.0), height=420,
                                camera_position=(75, 80, None),  # from behind the camera, a little to the side
                                elem_id="point-cloud-view",
                            )  # fmt: skip
                            gr.HTML(NO_WEBGL_NOTICE, js_on_load=WEBGL_CHECK, elem_id="webgl-notice")
                            ply_3d = gr.DownloadButton("Download the point cloud (PLY, m)", elem_id="download-ply-3d")
                        with gr.Tab("Uncertainty"):
                            uncertainty_note = (
                                "Standard deviation of the model's per-pixel depth-bin distribution, in metres: where "
                                "it is large (red) the model hesitates between depths. Click to read a point."
                                if has_depth_bins(self.pipeline.model.config)
                                else "This model has no depth bins (head='regression'), so no uncertainty."
                            )
                            gr.Markdown(uncertainty_note)
                            uncertainty_picture = gr.Image(
                                label="Uncertainty (m)", show_label=False, buttons=[], type="pil", format="png",
                                interactive=False, elem_id="uncertainty-figure",
                            )  # fmt: skip
                            uncertainty_clicked = gr.Textbox(
                                label="Uncertainty at the clicked point", interactive=False,
                                value=UNCERTAINTY_CLICK_PROMPT, elem_id="clicked-uncertainty",
                            )  # fmt: skip
                            uncertainty_npy = gr.DownloadButton(
                                "uncertainty float32 .npy (m)", elem_id="download-uncertainty"
                            )
                    clicked = gr.Textbox(
                        label="Depth at the clicked point", value=CLICK_PROMPT,
                        interactive=False, elem_id="clicked-depth",
                    )  # fmt: skip
                    with gr.Row():
                        low = gr.Number(label="Minimum depth (m)", interactive=False, elem_id="min-depth")
                        median = gr.Number(label="Median depth (m)", interactive=False, elem_id="median-depth")
                        high = gr.Number(label="Maximum depth (m)", interactive=False, elem_id="max-depth")
                    with gr.Row():
                        png = gr.DownloadButton("16-bit PNG (mm)", elem_id="download-png")
                        npy = gr.DownloadButton("float32 .npy (m)", elem_id="download-npy")
                        ply = gr.DownloadButton("PLY point cloud (m)", elem_id="download-ply")
                    notes = gr.Textbox(label="Run", interactive=False, elem_id="notes")
            depth_state = gr.State()
            uncertainty_state = gr.State()
            outputs = [
                figure, slider, low, median, high, png, npy, ply, view, notes, depth_state,
                uncertainty_picture, uncertainty_npy, uncertainty_state,
            ]  # fmt: skip
            predicted = run.click(
                self.predict, inputs=[image_input, camera, fov], outputs=outputs, api_name="predict",
                api_description="Metric depth of an image: the depth picture with its colour bar, an RGB/depth pair, "
                "min/median/max depth in metres, the 16-bit PNG (mm), float32 .npy (m) and PLY files, a 3D preview "
                "and notes, then the uncertainty picture and float32 .npy (m; none for a model without depth bins). "
                "`camera` is auto, nyu or fov (then `fov_deg` is used).",
            )  # fmt: skip
            # an upload, a clicked example or a removed image: the previous readings go at once, then the model runs.
            # Not `image_input.change`: it fires twice for one upload, and the second clear would wipe a reading
            # taken in between.
            cleared = [*outputs, clicked, uncertainty_clicked]
            image_input.clear(self.clear, outputs=cleared, queue=False, api_visibility="private")
            events = [predicted]
            for arrival in (image_input.upload(self.clear, outputs=cleared, queue=False, api_visibility="private"),
                            examples.load_input_event.then(self.clear, outputs=cleared, queue=False,
                                                           api_visibility="private")):  # fmt: skip
                events.append(arrival.then(self.predict_new_image, inputs=[image_input, camera, fov], outputs=outputs,
                                           api_visibility="private"))  # fmt: skip
            for event in events:
                event.then(lambda path: path, inputs=[ply], outputs=[ply_3d], queue=False, api_visibility="private")
            figure.select(self.depth_at, inputs=[depth_state], outputs=[clicked], api_visibility="private")
            uncertainty_picture.select(
                self.uncertainty_at, inputs=[uncertainty_state, depth_state], outputs=[uncertainty_clicked],
                api_visibility="private",
            )  # fmt: skip
        return demo


def space_model() -> str | None:
    """The model a Space runs: $MOA_DEPTHCLIP_MODEL, else the first `models:` entry of the card beside this file."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    card = Path(__file__).resolve().parent / "README.md"
    if card.is_file():
        from huggingface_hub import metadata_load

        models = (metadata_load(card) or {}).get("models") or []
        return models[0] if models else None
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=space_model(),
        help=f"saved model folder or Hugging Face Hub id (default: ${MODEL_ENV}, else the card's `models:`)",
    )  # fmt: skip
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1: this machine only)")  # fmt: skip
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="weights and activations (default: float32 as saved; int8 is the fastest on CPU, see BENCHMARKS.md)",
    )  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond this are refused")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not args.model:
        raise SystemExit(f"error: give --model PATH_OR_HUB_ID (a saved MoA-DepthCLIP) or set ${MODEL_ENV}; the "
                         "training run writes outputs/train/best")  # fmt: skip
    try:
        depth_pipeline = load_depth_pipeline(args.model, args.device, args.dtype)
    except (ModelLoadError, QuantizationUnavailableError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    # the first call sets up the kernels (and int8's session): pay it before the first visitor
    size = depth_pipeline.image_processor.size
    depth_pipeline(Image.new("RGB", (size["width"], size["height"])))
    demo = DepthDemo(depth_pipeline, args.model, find_nyu_sample()).build()
    serve(demo, args.host, args.port, max_queue=args.max_queue)


def serve(demo: gr.Blocks, host: str, port: int, *, max_queue: int = 32, block: bool = True):
    """Launch the page; with `block=False` return at once (tests), `demo.close()` stops it."""
    # one image at a time on the model; a bounded queue refuses the excess instead of growing without limit
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo.launch(
        server_name=host, server_port=port, show_error=True, prevent_thread_lock=not block, quiet=not block,
        theme=gr.themes.Soft(), css=PAGE_CSS, footer_links=["api"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
