"""The `moa-depthclip` command line."""

from .predict import build_parser, main
