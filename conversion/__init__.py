"""Command lines that write, check and publish MoA-DepthCLIP checkpoint folders; run them from the repository root:

    python -m conversion.convert_clip_to_moa_depthclip --clip_model SOURCE --output_dir DIR
    python -m conversion.convert_prototype_checkpoint --checkpoint FILE --output_dir DIR --clip_model SOURCE
    python -m conversion.export_onnx --model DIR --output model.onnx
    python -m conversion.onnx_inference --model model.onnx IMAGE...
    python -m conversion.publish --folder DIR --repo_id USER/NAME

The model-side work (reading CLIP checkpoints, initialising a model from one) lives in the installed package
(`modeling_moa_depthclip.clip.checkpoints`, `modeling_moa_depthclip.clip.initialization`); `conversion.common`
holds what the converters share (output folders, self-checks, command-line options), `conversion.model_card` the
model card.
"""
