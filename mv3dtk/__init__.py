"""mv3d: MedVista3D — 3D CT vision-language pretraining and its downstream tasks, as a CLI of
composable stages.

Public API (importing it is cheap: no torch, no heavy libraries)::

    from mv3dtk import Stage, Artifact, Project, StageContext, pass_stage_context, Mv3dError, load_model
"""

from .errors import Mv3dError
from .project import Project
from .registry import Artifact, Stage
from .runs import StageContext, pass_stage_context
from .version import __version__


def load_model(path, **kwargs):
    """Rebuild a trained MedVista3D from ``pretrain/<run>/model/`` alone (imports torch lazily)."""
    from .models.medvista3d import load_model as _load

    return _load(path, **kwargs)


__all__ = ["Artifact", "Mv3dError", "Project", "Stage", "StageContext", "load_model", "pass_stage_context",
           "__version__"]
