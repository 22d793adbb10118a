"""The NYU Depth V2 evaluation protocol, its metrics, and the reports and pictures it writes."""

from .metrics import (
    CROPS,
    METRIC_KEYS,
    DepthMetricsAccumulator,
    NoValidDepthError,
    compute_depth_metrics,
    eigen_crop_mask,
    evaluation_pixels,
    format_metrics_markdown,
    garg_crop_mask,
)
from .protocol import (
    AVERAGING,
    NYU_SAMPLE_ENV,
    EvaluationSettings,
    check_output_dir,
    dataset_label,
    depth_range,
    evaluate,
    format_report,
    format_result_line,
    load_dataset_or_error,
    nyu_sample_dir,
    predict_depth,
    safe_frame_filename,
    save_samples_panel,
    write_evaluation_outputs,
)
from .uncertainty import (
    SPARSIFICATION_FRACTIONS,
    UNCERTAINTY_METRICS,
    SparsificationAccumulator,
    ause,
    format_uncertainty_markdown,
    image_sparsification,
    plot_sparsification,
    sparsification_curve,
)
