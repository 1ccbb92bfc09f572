"""imagen-ops: Imagen (Saharia et al. 2022) as a reproducible, scheduled training system."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imagen-ops")
except PackageNotFoundError:  # run from a logged model's code copy, not installed
    __version__ = "0+unknown"
