"""Reward models learned from expert ratings and the reward service (see DESIGN.md)."""
