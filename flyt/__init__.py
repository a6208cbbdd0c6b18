"""flyt: learned data filtering for CLIP pretraining (FLYT, M-FLYT, Soft/Hard Cap Sampling).

Importing the package is cheap: torch and open_clip load only inside the modules that need them.
It does make the package's model configs (``flyt-tiny``, ``flyt-small``) known to OpenCLIP, now if
open_clip is already imported, else the moment it is, so that third-party code (open_clip_train,
DataComp's scripts, clip_benchmark) loads flyt checkpoints by name after a plain ``import flyt``.
"""

import importlib.abc
import sys
from pathlib import Path

__version__ = "0.1.0"

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered_with = None  # the open_clip module our configs were added to


def register_model_configs(open_clip) -> None:
    """Add the package's configs to this ``open_clip`` module's registry (once per module object)."""
    global _registered_with
    if _registered_with is not open_clip:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered_with = open_clip


class _RegisteringLoader(importlib.abc.Loader):
    """open_clip's own loader, plus the registration once its module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace of the wrapper
        register_model_configs(module)

    def __getattr__(self, name):  # resource readers, get_source, ...: the wrapped loader's
        return getattr(self._loader, name)


class _OpenClipFinder(importlib.abc.MetaPathFinder):
    """Finds open_clip through the other finders, once, and wraps its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "open_clip":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


if "open_clip" in sys.modules:
    register_model_configs(sys.modules["open_clip"])
elif not any(isinstance(f, _OpenClipFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _OpenClipFinder())
