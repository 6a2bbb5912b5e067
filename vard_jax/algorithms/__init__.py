"""Training objectives over the shared rollout: VARD, DDPO, DRaFT/AlignProp."""
