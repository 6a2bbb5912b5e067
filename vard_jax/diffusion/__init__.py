"""DDIM schedule, step and the differentiable rollout scan."""
