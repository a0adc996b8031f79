"""Synthetic augmentation (EMIT-Diff): an edge- and text-conditioned diffusion model and the image-mask pairs it makes."""
