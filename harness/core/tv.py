"""Import torchvision (and so diffusers) on a CPU-only torch.

Every torchvision wheel on PyPI is a CUDA build; on the CPU torch its import fails with
``operator torchvision::nms does not exist`` because the compiled extension that registers the
``torchvision::`` operators cannot load. The Python parts we use (models, transforms.v2) do not
need those kernels, only the two operator schemas that torchvision's abstract implementations
refer to at import time. We define them only after a real import failed: where torch and
torchvision are matching CUDA builds the extension registers them itself, and defining them
first would clash. Everything that uses torchvision or diffusers imports it through here.
"""

from __future__ import annotations

import sys
from types import ModuleType

_LIBRARY = None  # keep the torch.library.Library alive, or the definitions vanish


def _define_missing_schemas() -> None:
    global _LIBRARY
    import torch

    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_torchvision() -> ModuleType:
    """Return the torchvision module, repairing the CPU-torch import failure when it happens."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_missing_schemas()
        import torchvision
    return torchvision


torchvision = import_torchvision()
