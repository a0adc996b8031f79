"""The method: a frozen diffusion backbone read at a few noise steps, a frozen text encoder, cross-attention fusion and
a pixel head, assembled into the segmenter and its checkpoint."""
