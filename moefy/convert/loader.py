"""load(): re-apply the conversions a folder records to a dense base model, then load the weights; a failed load
leaves the base model as it was.

Everything is checked before the base is touched: ``moefy.json`` and the weights file's header
(:mod:`moefy.convert.folder`), each recorded size against the header (experts, shared experts, router columns,
input size, a family-routed block's stacked experts), then the conversions on a copy of the base on the meta device
(no memory) against every key and shape of the header, then the weights' data. Only then is the base converted
(each replaced submodule put back if anything still fails) and loaded.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Set, Tuple

import torch
from torch import nn

from .folder import Conversion, Header, Meta, bad, read_header, read_meta, read_tensors
from .recorded import RECORDED, EntryMismatch
from .surgery import _mixture, _set_submodule, moefy_chain
from .writer import check_model, keep_save_pretrained

logger = logging.getLogger(__name__)

_QUIET = ("moefy.convert.surgery", "moefy.hf.from_hf")  # their logs come once, from the real conversion


@dataclass
class Plan:
    """A checked folder: its ``moefy.json``, the weights' header, and the experts each conversion has there."""
    meta: Meta
    header: Header
    experts: Dict[int, int]  # conversion index -> number of experts the weights hold at its path

    @property
    def weights(self) -> str:
        return self.header.path


def _counts(header: Header) -> Dict[Tuple[str, str], Set[int]]:
    """``{(module path, "experts" / "shared_experts"): indices}`` of the header's keys, in one pass."""
    counts = defaultdict(set)
    for key in header.tensors:
        parts = key.split(".")
        for j in range(len(parts) - 2):
            if parts[j] in ("experts", "shared_experts") and parts[j + 1].isdigit() and len(parts[j + 1]) < 10:
                counts[(".".join(parts[:j]), parts[j])].add(int(parts[j + 1]))
    return counts


def _touched(c: Conversion) -> List[str]:
    """The submodule paths a conversion replaces."""
    if c.chain is None:
        return [c.path]
    parent, names = c.chain
    return [f"{parent}.{n}" if parent else n for n in names]


def _check_disjoint(meta: Meta) -> None:
    seen: Dict[str, int] = {}
    for c in meta.conversions:
        for path in _touched(c):
            for other, i in seen.items():
                if path == other or not path or not other or path.startswith(other + ".") or \
                        other.startswith(path + "."):
                    raise bad(meta.path, f"{c.field}.path", f"{path!r} overlaps {other!r} of conversions[{i}]; "
                                                            f"allowed: disjoint submodules (the whole model alone)")
            seen[path] = c.index


def _check_sizes(c: Conversion, plan_counts, header: Header, meta: Meta) -> int:
    """Each size ``c`` declares against the weights' header, before anything is built; the number of experts the
    weights hold at ``c.path``."""
    name = os.path.basename(header.path)
    prefix = c.path + "." if c.path else ""
    stacked = RECORDED[c.cls].stacked if c.cls in RECORDED else None
    if stacked is not None:
        return _check_stacked(c, f"{prefix}{stacked}.", header, meta)
    router = header.tensors.get(prefix + "router.gate.weight")
    if router is None or len(router[1]) != 2:
        raise bad(meta.path, f"{c.field}.path", f"{name} holds no router at {c.path!r} "
                                                f"({prefix}router.gate.weight); allowed: a path the weights hold")
    rows, dim = router[1]
    experts = plan_counts.get((c.path, "experts"), set())
    if experts and experts != set(range(len(experts))):
        raise bad(header.path, "keys", f"the experts at {c.path!r} are numbered {sorted(experts)[:8]}, not 0, 1, ...")
    if c.cls in RECORDED:
        return len(experts)
    held = len(experts) if experts else rows
    if c.num_experts != held and (experts or c.num_experts > rows):
        raise bad(meta.path, f"{c.field}.num_experts", f"{c.num_experts}, but {name} holds {held} experts at "
                                                       f"{c.path!r}; allowed: {held}")
    nulls = c.config.null_experts or {}
    columns = c.num_experts + sum(nulls.values()) + int(c.config.hole)
    if columns != rows:
        raise bad(meta.path, f"{c.field}.config", f"num_experts {c.num_experts} + null_experts {dict(nulls)} + hole "
                                                  f"{c.config.hole} make {columns} router columns, but {name} holds "
                                                  f"{rows} ({prefix}router.gate.weight); allowed: {rows} in all")
    if c.input_dim != dim:
        raise bad(meta.path, f"{c.field}.input_dim", f"{c.input_dim}, but the router in {name} reads {dim} features "
                                                     f"({prefix}router.gate.weight {tuple(router[1])}); allowed: {dim}")
    shared = plan_counts.get((c.path, "shared_experts"), set())
    if c.num_shared != len(shared) and (shared or c.num_shared > c.num_experts):
        raise bad(meta.path, f"{c.field}.num_shared", f"{c.num_shared}, but {name} holds {len(shared)} shared experts "
                                                      f"at {c.path!r}; allowed: {len(shared)}")
    if c.num_experts % c.granularity:
        raise bad(meta.path, f"{c.field}.granularity", f"{c.granularity} does not divide num_experts "
                                                       f"{c.num_experts}; allowed: a divisor of it")
    return held


def _check_stacked(c: Conversion, prefix: str, header: Header, meta: Meta) -> int:
    """The entry's ``num_experts`` of a block whose experts are stacked under ``prefix`` (a family-routed block: no
    router of its own), against the weights' header: every tensor there has a non-zero multiple of that many rows
    (the data behind them is in the file, so a count cannot be inflated without the bytes)."""
    name = os.path.basename(header.path)
    shapes = {k: shape for k, (_, shape) in header.tensors.items() if k.startswith(prefix)}
    if not shapes:
        raise bad(meta.path, f"{c.field}.path", f"{name} holds no stacked experts at {c.path!r} ({prefix}*); "
                                                f"allowed: a path the weights hold")
    experts = c.fields["num_experts"]  # an integer (read_meta checked the type)
    if experts < 1:
        raise bad(meta.path, f"{c.field}.num_experts", f"{experts}; allowed: an integer >= 1")
    wrong = sorted(k for k, shape in shapes.items() if not shape or shape[0] < experts or shape[0] % experts)
    if wrong:
        raise bad(meta.path, f"{c.field}.num_experts", f"{experts}, but {name} holds {wrong[0]} {shapes[wrong[0]]}, "
                                                       f"not a non-zero multiple of {experts} rows; allowed: the "
                                                       f"experts the weights stack there")
    return experts


def prepare(folder) -> Plan:
    """``folder``'s ``moefy.json`` and weights header, every field and recorded size checked; nothing built."""
    meta = read_meta(folder)
    header = read_header(meta)
    for key, kept in meta.aliases.items():
        if key in header.tensors or kept not in header.tensors:
            raise bad(meta.path, f"aliases[{key!r}]", f"{kept!r}: allowed: a key the weights file does not hold, "
                                                      f"aliasing one it holds")
    _check_disjoint(meta)
    counts = _counts(header)
    experts = {c.index: _check_sizes(c, counts, header, meta) for c in meta.conversions}
    return Plan(meta, header, experts)


def _convert(model: nn.Module, c: Conversion, plan: Plan) -> nn.Module:
    """Re-apply one checked conversion to ``model`` in place; the new mixture (or the root one)."""
    meta = plan.meta
    try:
        if c.cls in RECORDED:
            model.get_submodule(c.path)
            try:
                return RECORDED[c.cls].convert(model, c.path, c.config, plan.experts[c.index], c.fields)
            except EntryMismatch as err:
                raise bad(meta.path, f"{c.field}.{err.field}", f"{err.problem}; pass the dense model this folder "
                                                               f"was saved from") from None
        parent = model.get_submodule(c.chain[0]) if c.chain is not None and c.chain[0] else model
        dense = model.get_submodule(c.path) if c.path else model
    except AttributeError as err:
        raise ValueError(f"model: the base model has no submodule {c.path!r} that {meta.path} converts "
                         f"({c.field}.path: {err}); pass the dense model this folder was saved from") from None
    options = dict(num_experts=c.num_experts, config=c.config, input_dim=c.input_dim, num_shared=c.num_shared,
                   expert_noise=0.0, granularity=c.granularity)
    try:
        if c.chain is not None:
            return moefy_chain(parent, c.chain[1], **options)
        if c.cls == "ModuleMixture":  # route / feature_dim as saved, not re-inferred
            options.update(route=c.config.route, feature_dim=c.config.feature_dim)
        mixture = _mixture(dense, **options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model: {meta.path} {c.field} converts {c.path!r}, a {type(dense).__name__} in the base "
                         f"model: {err}; pass the dense model this folder was saved from") from None
    if type(mixture).__name__ != c.cls:
        raise ValueError(f"model: {c.path!r} in the base model is a {type(dense).__name__}, which moefy turns into "
                         f"a {type(mixture).__name__}; {meta.path} records a {c.cls}")
    if c.path:
        _set_submodule(model, c.path, mixture)
    return mixture


def _convert_all(model: nn.Module, plan: Plan) -> nn.Module:
    for c in plan.meta.conversions:
        result = _convert(model, c, plan)
        if not c.path:
            model = result
    return model


def _state_keys(plan: Plan) -> Dict[str, Tuple[int, ...]]:
    shapes = {k: shape for k, (_, shape) in plan.header.tensors.items()}
    shapes.update({k: shapes[kept] for k, kept in plan.meta.aliases.items()})
    return shapes


def check_keys(model: nn.Module, plan: Plan, what: str = "model") -> None:
    """Every key and shape of ``model`` (converted) against the weights' header."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = _state_keys(plan)
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(f"{k}: saved {saved[k]}, {what} {own[k]}" for k in set(own) & set(saved) if saved[k] != own[k])
    if missing or unexpected or shapes:
        raise ValueError(f"model does not match the weights in {plan.weights}: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}"
                         + (" (and more)" if max(len(missing), len(unexpected), len(shapes)) > 8 else "")
                         + "; pass the dense model this folder was saved from")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _QUIET]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no memory, tying kept)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def check_on_meta(shadow: nn.Module, plan: Plan) -> bool:
    """Check ``shadow`` (the dense base on the meta device) against the weights' header: the shapes of the keys it
    keeps, then every key and shape once converted as the folder records. False where a conversion cannot run on
    the meta device (a probe forward: granularity > 1): :func:`apply` then checks while converting, undoing on
    failure."""
    saved = _state_keys(plan)
    own = {k: tuple(v.shape) for k, v in shadow.state_dict().items()}
    wrong = sorted(f"{k}: saved {saved[k]}, model {own[k]}" for k in set(own) & set(saved) if saved[k] != own[k])
    if wrong:
        raise ValueError(f"model does not match the weights in {plan.weights}: shape mismatches {wrong[:8]}"
                         + (" (and more)" if len(wrong) > 8 else "") + "; pass the dense model this folder was "
                         "saved from")
    try:
        with torch.device("meta"), _quiet():
            shadow = _convert_all(shadow, plan)
    except (RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err):
            raise
        logger.debug("moefy.load: a conversion does not run on the meta device (%s); checking while converting", err)
        return False
    check_keys(shadow, plan)
    return True


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Read the weights, convert ``model`` in place and load them; each replaced submodule is put back if anything
    fails. ``model`` (converted), or the root mixture."""
    state = read_tensors(plan.header)
    for key, kept in plan.meta.aliases.items():
        state[key] = state[kept]
    replaced: List[Tuple[str, nn.Module]] = []
    try:
        result = model
        for c in plan.meta.conversions:
            replaced += [(p, model.get_submodule(p)) for p in _touched(c) if p]
            converted = _convert(model, c, plan)
            result = converted if not c.path else result
        check_keys(result, plan)
        _match_dtypes(result, state)
        result.load_state_dict(state, strict=True)
    except BaseException:
        for path, original in reversed(replaced):
            _set_submodule(model, path, original)
        raise
    if plan.meta.conversions:
        keep_save_pretrained(result)
    for keep in dict.fromkeys(RECORDED[c.cls].save_pretrained for c in plan.meta.conversions if c.cls in RECORDED):
        if keep is not None:  # e.g. a family-routed model's: the family's own layout, as from_hf gave it
            keep(result)
    return result


def load(model: nn.Module, folder) -> nn.Module:
    """Re-apply every conversion recorded by :func:`moefy.save` in ``folder`` to the dense base ``model`` (in place),
    then load the saved weights strictly. ``folder`` is untrusted: see :mod:`moefy.convert.folder`.

    Returns:
        ``model``, converted and loaded (the new mixture if the saved model was itself one mixture).
    Raises:
        FileNotFoundError: ``folder`` missing, or a file it needs missing (no ``moefy.json``: not written by
            :func:`moefy.save`).
        ValueError: a malformed field (naming the file and the field), a file the commit record does not match (an
            interrupted save), a recorded path missing from ``model``, or missing / unexpected / mis-shaped
            weights. ``model`` is then unchanged.
    """
    check_model(model)
    plan = prepare(folder)
    try:
        shadow = meta_copy(model)
    except Exception as err:  # noqa: BLE001 (a module deepcopy cannot copy: check on the real one, undo on failure)
        logger.debug("moefy.load: no meta copy of %s (%s); checking while converting", type(model).__name__, err)
    else:
        check_on_meta(shadow, plan)
    return apply(model, plan)


def _match_dtypes(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Give every floating tensor the saved dtype, so a router cast with the model (``model.double()`` after
    ``moefy``, where a rebuilt router is float32) computes what it computed when saved."""
    for key, tensor in model.state_dict(keep_vars=True).items():
        saved = state[key]
        if tensor.dtype != saved.dtype and tensor.is_floating_point() and saved.is_floating_point():
            with torch.no_grad():
                tensor.data = tensor.data.to(saved.dtype)
