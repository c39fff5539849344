"""User-facing errors. Every message says what is wrong *and* what to do about it.

The CLI turns an ``Mv3dError`` into ``Error: <message>`` and exit code 1 (no traceback unless
``--debug`` / ``MV3D_DEBUG=1``). Library code raises these for anything the user can fix; a plain
exception means a bug in mv3d.
"""

from __future__ import annotations


class Mv3dError(Exception):
    """Base class: a problem the user can fix. The message must contain the fix."""


class NotAProjectError(Mv3dError):
    """The project directory does not exist or was never initialised."""


class MissingInputError(Mv3dError):
    """A stage needs an artifact that no earlier stage has produced yet."""


class MissingOutputError(Mv3dError):
    """A stage finished but did not write an output it declared (a bug in that stage)."""


class ConfigError(Mv3dError):
    """``mv3d.toml`` or an option value is invalid."""


class StageLockedError(Mv3dError):
    """Another process is running the same stage in the same project."""


class PluginError(Mv3dError):
    """A plugin stage could not be loaded."""


class DataError(Mv3dError):
    """Input data is malformed (a CSV, a volume, a mask)."""
