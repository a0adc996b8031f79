"""Weak supervision: the class-conditional diffusion model (CDM) and the masks it proposes from image-level labels."""
