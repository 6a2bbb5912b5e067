"""Model loaders behind one interface: the embedded shapes world, Stable Diffusion; LoRA."""
