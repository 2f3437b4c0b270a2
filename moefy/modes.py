"""evaluating(): modules in eval mode for a probe or a capture, every submodule's own train/eval flag restored after
(``module.train(mode)`` would set one flag for all, losing the mixed flags a mixture's experts may keep)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Every module of ``modules`` (and its submodules) in eval mode inside the block; flags restored on exit, also
    on error."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag
