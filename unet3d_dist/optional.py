"""Dependencies that only some features need, imported on first use.

SimpleITK (reading and writing scans) and medpy (the reference metrics of ``bench eval``) are installed with the
package, but a bare GPU machine may lack them. Training, the benchmarks and evaluation of a prepared dataset with
HDF5 masks never touch them, so they must run there; a feature that does need one says so in one sentence. (wandb,
the third, is the logger's: without it a run logs to metrics.jsonl.)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .exit_codes import BadInput


class MissingDependency(BadInput, ImportError):
    """A feature needs a package that is not installed in this environment."""


class OptionalModule:
    """Stands in for ``import name``: the real import happens at the first attribute read."""

    def __init__(self, name: str, feature: str, package: str):
        self._name, self._feature, self._package = name, feature, package
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        if self._module is None:
            self._module = require(self._name, self._feature, self._package)
        return getattr(self._module, attribute)


def require(name: str, feature: str, package: str) -> ModuleType:
    """``name`` imported, or MissingDependency naming the feature and the package to install."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependency(
            f"{feature} needs the Python package {package}, which is not installed here (pip install {package})"
        ) from err


sitk = OptionalModule("SimpleITK", "reading or writing scans and masks (NIfTI, NRRD, MHA, DICOM)", "SimpleITK")
medpy_binary = OptionalModule("medpy.metric.binary", "medpy's reference metrics", "medpy")
