"""The original MoEfy's ``moefy.utils``: its plot functions, now in :mod:`moefy.viz` (the same objects).

``import moefy.utils`` does not load matplotlib; using one of the names below does.

- ``display_experts_load(block, expert_loads)``: :func:`moefy.viz.plot_experts_load`
- ``display_abs_experts_load(block, expert_loads)``: :func:`moefy.viz.plot_total_load`
- ``image_through_experts(image, model, patch_size)``: :func:`moefy.viz.image_through_experts` (returns the
  Figures instead of showing them)

The old module's helpers went elsewhere: ``evaluating`` is :func:`moefy.modes.evaluating` (it yields nothing),
the patch masks are :func:`moefy.viz.patch_masks`, one block's panels :func:`moefy.viz.plot_patch_routing`.
"""
from importlib import import_module

__all__ = ["display_experts_load", "display_abs_experts_load", "image_through_experts"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("moefy.viz"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
