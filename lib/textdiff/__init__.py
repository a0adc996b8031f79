"""TextDiff: label-efficient segmentation from frozen diffusion features fused with report text."""

__version__ = "0.1.0"
