"""medrl: the application layer (CLI, run config composition, run directories)."""

__version__ = "0.1.0"
