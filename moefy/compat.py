"""Old names that keep working: moefy 0.1's top-level names that left the curated API, and the original MoEfy's.

Each name is the very object at its new home (given next to it); none warns, as none is scheduled for removal.
``import moefy`` does not load this module: ``moefy.Router`` and the other ``TOP_LEVEL`` names load it on first
use (through ``moefy.__getattr__``), and ``moefy.viz`` imports its plot aliases from here.

The old import paths work too: ``from moefy.moefy import MoEBlock`` and ``import moefy.metrics`` (modules that
``import moefy`` registers, :mod:`moefy._import_paths`; the attribute ``moefy.moefy`` stays the conversion function),
``from moefy.utils import display_experts_load, display_abs_experts_load, image_through_experts``
(:mod:`moefy.utils`), ``import moefy.data``.
"""
import moefy.data as data  # home: moefy.data (example data sets); `import … as` binds it without moefy.__getattr__

from .config import ROUTE_ALIASES  # home: moefy.config; the original MoEfy's route "images" is "samples"
from .recipes import metrics  # home: moefy.recipes.metrics
from .routing.losses import AUX_LOSSES, cv_squared  # home: moefy.routing.losses (also in moefy.routing)
from .routing.router import Router  # home: moefy.routing.router (also in moefy.routing)

#: moefy 0.1's top-level names that ``moefy.__getattr__`` still serves (``dir(moefy)`` does not list them)
TOP_LEVEL = ("Router", "cv_squared", "AUX_LOSSES", "data", "metrics")

#: the original MoEfy's plot names → their ``moefy.viz`` names (also importable from ``moefy.viz``). Resolved on
#: first use, so that the names above do not import matplotlib.
VIZ_ALIASES = {"display_experts_load": "plot_experts_load", "display_abs_experts_load": "plot_total_load"}

__all__ = [*TOP_LEVEL, *VIZ_ALIASES, "ROUTE_ALIASES"]


def __getattr__(name):
    if name in VIZ_ALIASES:
        from .viz import load
        return getattr(load, VIZ_ALIASES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(VIZ_ALIASES))
