"""The project's own Flax (linen) networks: the Stable Diffusion UNet, the VAE and CLIP.

Sizes come from the public ``config.json`` files read as data; parameter trees mirror the
public checkpoints' names (the layout diffusers' and transformers' Flax ports used), so that
PyTorch weights load by a rename table plus transposes (``vard_jax.models.nn.convert``), and
checkpoints written by earlier versions of this project keep loading.
"""
