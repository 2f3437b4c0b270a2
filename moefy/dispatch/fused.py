"""Fused experts: all E homogeneous experts run as one pass per layer over the token-sorted rows.

Experts qualify when every one is a plain ``nn.Linear``, an ``nn.Sequential`` of plain ``nn.Linear``
layers and parameter-free elementwise activations (torch's, or transformers' ``ACT2FN`` ones), or a SwiGLU MLP (``gate_proj`` / ``up_proj`` /
``down_proj`` Linears and a parameter-free ``act_fn``, computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``:
HF's ``LlamaMLP``, ``Qwen2MLP`` ..., :class:`moefy.hf.SwiGLU`; checked on a probe), with the same shapes and the
same activations (the clones ``moefy()`` makes, or a list built with one comprehension). Then, on the rows
grouped by expert (``A`` rows, ``counts[e]`` of them for expert e):

- an activation runs once on all A rows instead of once per expert;
- a Linear runs either as ``torch._grouped_mm`` over the experts' stacked weights (``"grouped"``: one kernel
  for all experts), or as one matmul per expert on its slice (``"loop"``: no module-call overhead), each
  writing its slice of one output buffer, and in backward its slice of the input gradient (no ``cat``).

``"auto"`` picks ``"grouped"`` only where it has a fast kernel: CUDA, bfloat16, compute capability ≥ 9.0.
Everywhere else ``torch._grouped_mm`` falls back to a loop of matmuls and stacking copies every expert's
weights each forward, so the loop is faster there (``benchmarks/FASTPATHS.md``). The experts keep owning
their parameters either way, so optimisers, ``state_dict`` and ``moefy()``'s merge see nothing new.

The fused pass reads the Linears' weights rather than calling them, so whatever wraps an expert later (a PEFT
adapter, a parametrization, hooks) would be skipped: :class:`moefy.dispatch.experts.FusedExperts` checks for that
before each call and runs the experts looped instead (one warning).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..fastpaths import FEW_ROWS, few_rows_each, linear, transposed_pays
from ..modes import evaluating
from ..wrappers import autocast_on, own_hooks

# Parameter-free activations that act elementwise, so running them once on all rows equals once per expert.
ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
               nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink)
# ("linear", i) or ("act", i): layer i of every expert; ("swiglu", gate, up, down, act): the named children
Layout = Tuple[tuple, ...]
SWIGLU = ("swiglu", "gate_proj", "up_proj", "down_proj", "act_fn")


def _elementwise(act) -> bool:
    """A parameter-free elementwise activation: torch's, or transformers' (``ACT2FN``: SiLUActivation, ...)."""
    return isinstance(act, nn.Module) and next(act.parameters(), None) is None and (
        type(act) in ELEMENTWISE or type(act).__module__ == "transformers.activations")


def _same_place(mine: nn.Linear, ref: nn.Linear) -> bool:
    return mine.weight.dtype == ref.weight.dtype and mine.weight.device == ref.weight.device


@torch.no_grad()
def _swiglu_layout(experts: Sequence[nn.Module]) -> Optional[Layout]:
    first = experts[0]
    parts = [getattr(first, name, None) for name in SWIGLU[1:4]]
    if not all(type(p) is nn.Linear for p in parts) or not _elementwise(getattr(first, "act_fn", None)):
        return None
    for expert in experts:
        if type(expert) is not type(first) or not _plain(expert) or repr(expert) != repr(first):  # repr: shapes, act
            return None
        if not all(_same_place(getattr(expert, n), p) for n, p in zip(SWIGLU[1:4], parts)):
            return None
    gate, up, down = parts
    if gate.weight.is_meta:  # no numbers to probe with (moefy.load's dry run): the structure decides
        return (SWIGLU,)
    x = torch.randn(3, gate.in_features, generator=torch.Generator().manual_seed(0)).to(gate.weight)
    with evaluating(first):
        try:  # its forward must be the SwiGLU formula (dropout, scaling, ... would make it something else)
            same = torch.allclose(first(x), down(first.act_fn(gate(x)) * up(x)), rtol=1e-5, atol=1e-6)
        except Exception:  # noqa: BLE001 (a forward that needs more than x is not a plain SwiGLU)
            same = False
    return (SWIGLU,) if same else None


def fused_layout(experts: Sequence[nn.Module]) -> Optional[Layout]:
    """The shared layer structure of ``experts`` if they can run fused, else None."""
    first = experts[0]
    if type(first) is not nn.Sequential and hasattr(first, "gate_proj"):
        return _swiglu_layout(experts)
    layers = list(first) if type(first) is nn.Sequential else [first]
    layout = []
    for i, layer in enumerate(layers):
        if type(layer) is nn.Linear:
            layout.append(("linear", i))
        elif _elementwise(layer):
            layout.append(("act", i))
        else:
            return None
    if not any(kind == "linear" for kind, _ in layout):
        return None
    for expert in experts:
        if type(expert) is not type(first) or not _plain(expert):
            return None
        others = list(expert) if type(first) is nn.Sequential else [expert]
        if len(others) != len(layers):
            return None
        for (kind, i), mine in zip(layout, others):
            ref = layers[i]
            if type(mine) is not type(ref) or repr(mine) != repr(ref):  # repr: shapes, bias, act options
                return None
            if kind == "linear" and not _same_place(mine, ref):
                return None
    return tuple(layout)


def _plain(module: nn.Module) -> bool:
    """No hooks, replaced forward or parametrizations anywhere: calling its layers' math directly is calling it."""
    return not any(own_hooks(m) or getattr(m, "parametrizations", None) for m in module.modules())


BACKENDS = ("auto", "grouped", "loop")


def runs_grouped(experts: Sequence[nn.Module], layout: Layout, x: torch.Tensor) -> bool:
    """Whether the ``"auto"`` backend runs every Linear of ``experts`` on ``x`` (A, D) as one grouped mm, which
    needs no host-side counts."""
    if not _auto_groups(x):
        return False
    first = experts[0]
    if layout == (SWIGLU,):
        return all(_grouped_mm_ok(x, getattr(first, n)) for n in SWIGLU[1:4])
    layers = list(first) if type(first) is nn.Sequential else [first]
    return all(_grouped_mm_ok(x, layers[i]) for kind, i in layout if kind == "linear")


def fused_experts_forward(experts: Sequence[nn.Module], layout: Layout, x: torch.Tensor,
                          counts: Optional[Sequence[int]], expert_index: torch.Tensor,
                          backend: str = "auto") -> torch.Tensor:
    """Run every expert on its rows of ``x``.

    Args:
        experts: E experts with the structure ``layout`` describes.
        layout: from :func:`fused_layout`.
        x: (A, D) rows grouped by expert, ``counts[e]`` rows for expert e, in expert order.
        counts: E host ints, ``sum(counts) == A``; may be None where every layer runs grouped
            (:func:`runs_grouped`), which finds the expert boundaries on the device.
        expert_index: (A,) long, the expert of each row (non-decreasing); a longer list is cut to A where
            read (only the grouped backend reads it).
        backend: ``"auto"``, ``"grouped"`` (``torch._grouped_mm``; float32 / half dtypes, feature sizes
            that keep 16-byte alignment) or ``"loop"``.
    Returns:
        (A, D_out), row i = ``experts[expert_index[i]](x[i])``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    may_group = backend == "grouped" or (backend == "auto" and _auto_groups(x))
    modules = list(experts)
    if counts is None and not may_group:
        raise ValueError("counts=None needs the grouped backend (see runs_grouped)")
    active = range(len(modules)) if may_group else [e for e, n in enumerate(counts) if n]  # the loop skips idle ones
    sizes = None if counts is None else [counts[e] for e in active]
    if layout == (SWIGLU,) and not may_group and not torch.is_grad_enabled() \
            and few_rows_each(x.shape[0], len(active)) and not autocast_on(x.device.type):  # decoding
        running = [modules[e] for e in active]
        if x.shape[0] == len(active) <= 6:  # one row each (one token's k experts): fewest ops as matrix-vector
            return _swiglu_one_row_each(x, running)
        return _swiglu_transposed(x, running, sizes)
    offsets = None

    def run(x: torch.Tensor, linears: List[nn.Linear]) -> torch.Tensor:
        """Linear e of ``linears`` on expert e's rows of ``x``: (A, in) → (A, out)."""
        nonlocal offsets
        grouped_ok = may_group and _grouped_mm_ok(x, linears[0])
        if backend == "grouped" and not grouped_ok:
            raise ValueError(f"backend='grouped' needs torch._grouped_mm, a float32 / half dtype (got {x.dtype}) "
                             f"and feature sizes that are multiples of {16 // x.element_size()}")
        if grouped_ok:
            if offsets is None:  # end row of each expert, found on the device: no host-to-device copy
                ends = torch.arange(1, len(modules) + 1, device=x.device, dtype=expert_index.dtype)
                offsets = torch.searchsorted(expert_index[:x.shape[0]], ends, out_int32=True)
            return _grouped_linear(x, linears, offsets, expert_index[:x.shape[0]])
        if sizes is None:
            raise ValueError(f"counts=None needs every Linear to run grouped; this one cannot ({linears[0]})")
        return _looped_linear(x, linears, sizes)

    if layout == (SWIGLU,):  # down(act(gate(x)) * up(x)); the activation once on all rows
        _, gate, up, down, act = SWIGLU
        h = getattr(modules[active[0]], act)(run(x, [getattr(modules[e], gate) for e in active]))
        return run(h * run(x, [getattr(modules[e], up) for e in active]), [getattr(modules[e], down) for e in active])
    layers = [list(modules[e]) if type(modules[e]) is nn.Sequential else [modules[e]] for e in active]
    for kind, i in layout:
        x = layers[0][i](x) if kind == "act" else run(x, [expert_layers[i] for expert_layers in layers])
    return x


def _swiglu_transposed(x: torch.Tensor, experts: Sequence[nn.Module], sizes: Sequence[int]) -> torch.Tensor:
    """SwiGLU experts on a few rows each, without grad: expert e's rows x_e (n_e, D) as
    ``W_down (act(W_gate x_e^T) * (W_up x_e^T))``, (D_out, n_e), each product written into expert e's columns of
    one buffer.

    Transposed, each product reads its weight where it lies instead of repacking it (``F.linear`` on 2-4 rows of a
    weight that is not in cache: half the time, ``benchmarks/FASTPATHS.md``); the activation runs once on all
    columns and writes them column-major, the layout in which the down products read them fast (row-major,
    ``W @ h`` on 2-8 columns takes 3x as long). Returns (A, D_out), a transposed view."""
    # the experts are vetted plain modules (no hooks, no replaced forward): their weights and the activation's
    # forward are read from the modules' dicts, nn.Module.__getattr__ and __call__ cost µs each per expert
    _, gate, up, down, act = SWIGLU
    parts = [e._modules for e in experts]
    hidden, num_rows = parts[0][gate].out_features, x.shape[0]
    gates, ups = x.new_empty(hidden, num_rows), x.new_empty(hidden, num_rows)  # (H, A) each
    for p, x_e, gate_e, up_e in zip(parts, x.t().split_with_sizes(sizes, 1), gates.split_with_sizes(sizes, 1),
                                    ups.split_with_sizes(sizes, 1)):          # x_e: (D, n_e), column-major
        torch.mm(p[gate]._parameters["weight"], x_e, out=gate_e)
        torch.mm(p[up]._parameters["weight"], x_e, out=up_e)
    h = torch.mul(parts[0][act].forward(gates), ups, out=x.new_empty(num_rows, hidden).t())  # (H, A) col-major
    y = x.new_empty(parts[0][down].out_features, num_rows)                     # (D_out, A)
    for p, h_e, y_e in zip(parts, h.split_with_sizes(sizes, 1), y.split_with_sizes(sizes, 1)):
        torch.mm(p[down]._parameters["weight"], h_e, out=y_e)
    return y.t()


def _swiglu_one_row_each(x: torch.Tensor, experts: Sequence[nn.Module]) -> torch.Tensor:
    """SwiGLU experts on one row each (row i: expert i), without grad, as matrix-vector products: for a handful
    of experts fewer ops than :func:`_swiglu_transposed`'s buffers (a decoding step costs ~8 µs per op on CPU).
    Returns (A, D_out)."""
    _, gate, up, down, act = SWIGLU
    parts, gates, ups = [], [], []
    for expert, row in zip(experts, x.unbind(0)):                             # vetted plain modules, as there
        p = expert._modules
        parts.append(p)
        gates.append(torch.mv(p[gate]._parameters["weight"], row))            # (H,)
        ups.append(torch.mv(p[up]._parameters["weight"], row))
    h = parts[0][act].forward(torch.stack(gates)).mul_(torch.stack(ups))      # (A, H)
    return torch.stack([torch.mv(p[down]._parameters["weight"], h_i) for p, h_i in zip(parts, h.unbind(0))])


def _auto_groups(x: torch.Tensor) -> bool:
    """Where ``torch._grouped_mm`` has a fast kernel: CUDA, bfloat16, compute capability ≥ 9.0."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def _grouped_mm_ok(x: torch.Tensor, linear: nn.Linear) -> bool:
    # grouped mm wants 16-byte aligned strides on both operands and a float32 / half dtype
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if linear.weight.dtype != x.dtype or x.dim() != 2:
        return False
    align = 16 // x.element_size()
    return linear.in_features % align == 0 and linear.out_features % align == 0


def _grouped_linear(x: torch.Tensor, linears: Sequence[nn.Linear], offsets: torch.Tensor,
                    expert_index: torch.Tensor) -> torch.Tensor:
    weight = torch.stack([l.weight for l in linears]).transpose(1, 2)  # (E, in, out)
    y = torch._grouped_mm(x, weight, offs=offsets)
    if linears[0].bias is not None:  # grouped mm takes no bias yet
        y = y + torch.stack([l.bias for l in linears]).index_select(0, expert_index)
    return y


def _looped_linear(x: torch.Tensor, linears: Sequence[nn.Linear], sizes: Sequence[int]) -> torch.Tensor:
    """Linear ``e`` on the ``sizes[e]`` rows of expert e: (A, in) → (A, out)."""
    if len(linears) == 1:
        return linear(x, linears[0].weight, linears[0].bias)
    grad = torch.is_grad_enabled()
    # autocast casts F.linear, not the out= matmuls; a few rows per expert (eval): cat of tiny products is cheaper
    if (grad or not few_rows_each(x.shape[0], len(linears))) and not autocast_on(x.device.type):
        weights = [l.weight for l in linears]
        biases = [l.bias for l in linears] if linears[0].bias is not None else []
        if grad and (x.requires_grad or any(p.requires_grad for p in weights + biases)):
            return _LoopedLinear.apply(x, list(sizes), *weights, *biases)
        return _linears_into(x, weights, biases, sizes)
    return torch.cat([linear(x_e, l.weight, l.bias) for x_e, l in zip(x.split_with_sizes(sizes), linears)])


def _linears_into(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                  sizes: Sequence[int]) -> torch.Tensor:
    """``weights[e]`` (out, in) and ``biases[e]`` (none if empty) on the ``sizes[e]`` rows of expert e, each
    product written into its slice of one (A, out) output: no ``cat`` of per-expert outputs."""
    y = x.new_empty(x.shape[0], weights[0].shape[0])
    for e, (x_e, y_e) in enumerate(zip(x.split_with_sizes(sizes), y.split_with_sizes(sizes))):
        bias = biases[e] if biases else None
        if transposed_pays(x_e, weights[e]):
            y_e.copy_(linear(x_e, weights[e], bias))
        elif bias is None:
            torch.mm(x_e, weights[e].t(), out=y_e)
        else:
            torch.addmm(bias, x_e, weights[e].t(), out=y_e)
    return y


class _LoopedLinear(torch.autograd.Function):
    """:func:`_linears_into` with a backward that also writes the input gradient slice by slice.

    Autograd through one ``F.linear`` per slice would ``cat`` the outputs in forward and the input gradients
    in backward, two extra passes over (A, ·).
    Arguments: x (A, in), sizes (E host ints), then E weights (out, in) and 0 or E biases (out,).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int], *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[:len(sizes)], params[len(sizes):]
        ctx.sizes, ctx.has_bias = sizes, bool(biases)
        ctx.save_for_backward(x, *weights)
        return _linears_into(x, weights, biases, sizes)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *weights = ctx.saved_tensors
        num, sizes = len(weights), ctx.sizes
        needs_w, needs_b = ctx.needs_input_grad[2:2 + num], ctx.needs_input_grad[2 + num:]
        grads_y = grad_y.split_with_sizes(sizes)
        grad_x = None
        if ctx.needs_input_grad[0] and torch.is_grad_enabled():  # create_graph: out= writes are not differentiable
            grad_x = torch.cat([g.mm(w) for g, w in zip(grads_y, weights)])
        elif ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for g, w, grad_x_e in zip(grads_y, weights, grad_x.split_with_sizes(sizes)):
                torch.mm(g, w, out=grad_x_e)
        grad_w, grad_b = [None] * num, [None] * num
        for e, (g, x_e) in enumerate(zip(grads_y, x.split_with_sizes(sizes))):
            if needs_w[e]:
                grad_w[e] = g.t().mm(x_e)
            if ctx.has_bias and needs_b[e]:
                grad_b[e] = g.sum(0)
        return (grad_x, None, *grad_w, *(grad_b if ctx.has_bias else ()))
