"""Evaluation metrics computed from features, and the HTML report (see DESIGN.md)."""
