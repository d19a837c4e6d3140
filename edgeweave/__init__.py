"""Code shared by meshd, edgecore and cloudcore: configuration, CLI conventions, logging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeweave")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
