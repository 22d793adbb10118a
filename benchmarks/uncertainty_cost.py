#!/usr/bin/env python
"""What the per-pixel uncertainty adds to MoA-DepthCLIP's forward time.

    python benchmarks/uncertainty_cost.py [--model PATH] [--height 224 --width 224] [--batch-size 1] [--repeats 30]

Times `model(pixel_values)` with the uncertainty computed (as shipped) and with its standard deviation skipped (the
model module's `bin_distribution_std` replaced by a view of the first bin, for this process only; the upsampling of
that map stays, so the ratio slightly understates the cost), interleaving the two so that both see the same machine
load, and prints the median of each and their ratio; it also times the uncertainty path alone (standard deviation
and upsampling on the model's own bin probabilities), which a busy machine blurs less than the difference of two
whole forwards. Without `--model` it builds
the default ViT-B/32 configuration with random weights (the time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402

from modeling_moa_depthclip import modeling_moa_depthclip as modeling  # noqa: E402
from modeling_moa_depthclip.cli.arguments import positive_int  # noqa: E402


@contextmanager
def uncertainty_skipped():
    """The model's forward without the bin-distribution standard deviation (restored on exit)."""
    shipped = modeling.bin_distribution_std
    modeling.bin_distribution_std = lambda probs, centers, dim=1: probs.select(dim, 0)
    try:
        yield
    finally:
        modeling.bin_distribution_std = shipped


def _seconds(model, pixel_values) -> float:
    start = time.perf_counter()
    model(pixel_values=pixel_values)
    return time.perf_counter() - start


@torch.no_grad()
def measure_uncertainty_cost(model, pixel_values, repeats: int = 30, warmup: int = 3) -> dict:
    """Median forward seconds with and without the uncertainty, measured interleaved, and their ratio."""
    for _ in range(warmup):
        model(pixel_values=pixel_values)
        with uncertainty_skipped():
            model(pixel_values=pixel_values)
    with_times, without_times, path_times = [], [], []
    with uncertainty_skipped():
        probabilities = model(pixel_values=pixel_values).bin_logits.float().softmax(dim=1)
    centers = modeling.depth_bin_centers(model.config)
    for index in range(repeats):
        start = time.perf_counter()
        modeling.upsample_to_input(modeling.bin_distribution_std(probabilities, centers), pixel_values)
        path_times.append(time.perf_counter() - start)
        # alternate which goes first so that neither always follows the other
        for skipped in ((False, True) if index % 2 == 0 else (True, False)):
            if skipped:
                with uncertainty_skipped():
                    without_times.append(_seconds(model, pixel_values))
            else:
                with_times.append(_seconds(model, pixel_values))
    with_median, without_median = statistics.median(with_times), statistics.median(without_times)
    path_median = statistics.median(path_times)
    return {
        "with_s": with_median,
        "without_s": without_median,
        "ratio": with_median / without_median,
        "path_s": path_median,
        "path_fraction": path_median / without_median,
        "repeats": repeats,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="saved model folder (default: the default config, random)")
    parser.add_argument("--height", type=positive_int, default=224)
    parser.add_argument("--width", type=positive_int, default=224)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed forwards of each kind")
    args = parser.parse_args(argv)

    if args.model:
        from modeling_moa_depthclip.loading import ModelLoadError, load_model_and_processor

        try:
            model, _ = load_model_and_processor(args.model)
        except ModelLoadError as error:
            parser.exit(2, f"{parser.prog}: error: --model: {error}\n")
    else:
        model = modeling.MoADepthCLIPForDepthEstimation(modeling.MoADepthCLIPConfig())
    model.eval()
    if not isinstance(model, modeling.MoADepthCLIPForDepthEstimation) or model.config.head == "regression":
        parser.exit(2, f"{parser.prog}: error: the model has no MoA-DepthCLIP depth bins: nothing to measure\n")
    patch = model.config.vision_config.patch_size
    if args.height % patch or args.width % patch:
        parser.exit(2, f"{parser.prog}: error: --height and --width must be multiples of the patch size {patch}\n")
    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    result = measure_uncertainty_cost(model, pixel_values, repeats=args.repeats)
    config = model.config
    num_bins = config.num_depth_bins
    print(
        f"forward {args.batch_size}x3x{args.height}x{args.width} ({config.head} head, {num_bins} "
        f"bins, {torch.get_num_threads()} threads): with uncertainty {result['with_s'] * 1000:.1f} ms, without "
        f"{result['without_s'] * 1000:.1f} ms (medians of {args.repeats}, interleaved); ratio {result['ratio']:.3f} "
        f"({(result['ratio'] - 1) * 100:+.1f} %); the uncertainty path alone {result['path_s'] * 1000:.1f} ms = "
        f"{result['path_fraction'] * 100:.1f} % of the forward without it"
    )
    return result


if __name__ == "__main__":
    main()
