"""What can wrap a module, for the fast paths that read a module's weights instead of calling it.

The router's float32 gate and the fused experts (:mod:`moefy.dispatch.fused`) compute ``F.linear`` on a Linear's
``weight`` themselves. That equals calling the module only while nothing wraps it: PEFT (LoRA) replaces an
``nn.Linear`` by its own module, ``torch.nn.utils.parametrize`` changes its class, module or global hooks and
accelerate's replaced ``forward`` run code around it. :func:`runs_as_written` tells the fast paths when to call
the module instead; :func:`autocast_on` when autocast would change the dtype of their matmuls.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

# a module's own hooks: the dicts nn.Module keeps in its __dict__ (torch < 2.2 has no _backward_pre_hooks)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# hooks for every module (register_module_forward_hook, ...): torch mutates these dicts, never rebinds them
_GLOBAL_HOOKS = [getattr(_module, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                     "_global_backward_hooks", "_global_backward_pre_hooks")
                 if hasattr(_module, name)]


def runs_as_written(module: nn.Module) -> bool:
    """Whether calling ``module`` runs only its class's ``forward``: no forward / backward hooks (its own or
    global ones) and no ``forward`` replaced on the instance. Its class is the caller's to check
    (``type(m) is nn.Linear``: a parametrized or PEFT-wrapped Linear is another class). O(1)."""
    return not own_hooks(module) and not global_hooks()


def own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward / backward hooks of its own, or a ``forward`` replaced on the instance
    (accelerate's ``add_hook_to_module``)."""
    d = module.__dict__  # spelled out: a generator over HOOK_DICTS costs µs per call
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                or d.get("_backward_pre_hooks") or "forward" in d)


def global_hooks() -> bool:
    """Whether a hook registered for every module (``nn.modules.module.register_module_forward_hook`` ...) is set."""
    return any(_GLOBAL_HOOKS)


def plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a subclass, a parametrized or a PEFT-wrapped one) that :func:`runs_as_written`:
    ``F.linear(x, module.weight, module.bias)`` is calling it."""
    return type(module) is nn.Linear and runs_as_written(module)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()
