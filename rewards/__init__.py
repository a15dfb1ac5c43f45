"""Reward models learned from expert ratings and the reward service (docs/architecture.md)."""
