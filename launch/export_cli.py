"""`dedistill export` (registered into launch/cli.py's parser; the work is in launch/export.py)."""

from launch.export import register

__all__ = ["register"]
