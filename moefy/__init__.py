"""moefy: turn any PyTorch module into a Mixture of Experts, and see what the router does."""
from .block import MoEBlock, aux_loss, moe_blocks
from .losses import AUX_LOSSES, cv_squared
from .routing import Router, Routing

__all__ = ["MoEBlock", "Routing", "Router", "aux_loss", "moe_blocks", "AUX_LOSSES", "cv_squared"]
__version__ = "0.1.0"
