"""Plots of what the router does. Every function returns a matplotlib Figure (never shows it) and works
under the Agg backend: ``fig.savefig(path)``."""
from .dashboard import (affinity_csv, plot_affinity, plot_coactivation, plot_dashboard, plot_dead_experts,
                        plot_entropy, plot_health, plot_max_vio, plot_metrics, plot_routing_accuracy,
                        plot_transition, plot_utilization)
from .load import plot_experts_load, plot_load_heatmap, plot_total_load
from .patches import PatchRouting, as_image, image_through_experts, patch_masks, plot_patch_routing, route_image
from .tokens import plot_token_routing

from ..compat import display_abs_experts_load, display_experts_load  # the original MoEfy's names (after .load)

__all__ = ["plot_experts_load", "plot_total_load", "plot_load_heatmap", "display_experts_load",
           "display_abs_experts_load", "image_through_experts", "route_image", "plot_patch_routing",
           "patch_masks", "as_image", "PatchRouting", "plot_utilization", "plot_entropy", "plot_routing_accuracy",
           "plot_affinity", "plot_metrics", "plot_dashboard", "affinity_csv", "plot_token_routing", "plot_health",
           "plot_max_vio", "plot_dead_experts", "plot_coactivation", "plot_transition"]
