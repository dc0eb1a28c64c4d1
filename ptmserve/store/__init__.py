"""The model repository on disk: content-addressed segments, atomic manifests, checksummed reads.

See ``ptmserve.store.repository`` for the layout.
"""

from ptmserve.store.maintenance import GcReport, ModelUsage, Problem, RepoUsage
from ptmserve.store.manifest import ModelManifest, TensorEntry
from ptmserve.store.repository import Repository

__all__ = ["GcReport", "ModelManifest", "ModelUsage", "Problem", "RepoUsage", "Repository", "TensorEntry"]
