"""Distributed DDPO on Ray: sampler actors, the learner, the loop, checkpoints (docs/architecture.md)."""
