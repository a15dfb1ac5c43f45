"""Distributed DDPO on Ray: sampler actors, the learner, the loop, checkpoints (see DESIGN.md)."""
