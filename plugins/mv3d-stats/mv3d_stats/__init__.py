"""mv3d-stats: an example third-party mv3d stage (``mv3d stats``)."""

__version__ = "0.1.0"
