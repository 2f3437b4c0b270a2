"""Reading a checkpoint folder as untrusted input: every file a plain name inside the folder (no absolute path,
``..``, separator or symlink out of it), a regular file of bounded size; ``moefy.json`` checked field by field; the
weights file's header (names, dtypes, shapes) read without its data and checked against the file's size and the
commit record of :mod:`moefy.convert.writer`. Every malformed field is a one-line ``ValueError`` naming the file,
the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import RoutingConfig
from .recorded import RECORDED
from .writer import CONFIG_NAME, FORMAT_VERSION, READ_VERSIONS

MAX_JSON_BYTES = 8 << 20  # moefy.json / config.json; a 1,000-layer model's moefy.json is < 2 MB
MAX_HEADER_BYTES = 16 << 20  # a safetensors header: ~100 bytes a tensor, 160,000 tensors
WEIGHT_SUFFIXES = (".safetensors", ".pt")
_COMPONENT = re.compile(r"[A-Za-z0-9_]+")
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                         "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_MIXTURE_FIELDS = {"path": str, "class": str, "config": dict, "num_experts": int, "num_shared": int,
                   "input_dim": int, "chain": (dict, type(None)), "granularity": int}
_MIXTURE_OPTIONAL = {"granularity": 1, "chain": None}


def _json_type(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", dict: "an object", list: "a list", type(None): "null"}
    return " or ".join(names[k] for k in kinds)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value)[:limit + 1]
    return text if len(text) <= limit else text[:limit] + "..."


def bad(path: str, field: str, problem: str) -> ValueError:
    """The one-line error of a malformed field: ``<file>: <field>: <problem>``."""
    return ValueError(f"{path}: {field}: {problem}".replace("\n", " "))


def check_folder(folder) -> str:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {os.fspath(folder)!r} does not exist or is not a directory")
    return os.fspath(folder)


def file_in(folder: str, name: Any, field: str, source: str) -> str:
    """The path of the regular file ``name`` in ``folder``, which ``source``'s ``field`` names: a plain file name
    whose real path (symlinks resolved) is inside the folder."""
    allowed = "allowed: a plain file name inside the folder (no path, '..' or symlink out of it)"
    if not isinstance(name, str) or not name or name in (".", "..") or "\0" in name or "/" in name or (
            os.sep in name) or (os.altsep and os.altsep in name) or os.path.isabs(name):
        raise bad(source, field, f"{_short(name)} is not a plain file name; {allowed}")
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{source}: {field}: {path} is missing (an interrupted moefy.save, or files "
                                f"copied without it?)")
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise bad(source, field, f"{name} is a symlink to {real}, outside the folder; {allowed}")
    try:
        mode = os.stat(real).st_mode
    except OSError as err:
        raise bad(source, field, f"{path} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise bad(source, field, f"{path} is not a regular file (a device, folder or pipe); {allowed}")
    return path


def read_bytes(path: str, limit: int, what: str) -> bytes:
    size = os.path.getsize(path)
    if size > limit:
        raise bad(path, "size", f"{size / 2 ** 20:.1f} MB; a {what} moefy reads is at most {limit >> 20} MB")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def parse_json(data: bytes, path: str) -> Any:
    """``data`` as JSON, every failure (bad UTF-8, syntax, nesting, a 5,000-digit number) a ValueError naming
    ``path``."""
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise bad(path, "JSON", "nested too deeply to read") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise bad(path, "JSON", f"not valid JSON ({err})") from None


def check_record(path: str, data: Optional[bytes], size: int, record: Dict[str, Any], meta_path: str) -> None:
    """The file at ``path`` is what ``moefy.json``'s commit record names: its size, and its sha256 if recorded."""
    name = os.path.basename(path)
    if size != record["bytes"]:
        raise bad(path, "size", f"truncated or replaced: {size} bytes, but {meta_path} commits {record['bytes']} "
                                f"bytes (files.{name}.bytes): an interrupted save or a partial copy; save again")
    if "sha256" in record:
        digest = hashlib.sha256(data).hexdigest() if data is not None else _file_sha256(path)
        if digest != record["sha256"]:
            raise bad(path, "sha256", f"replaced: its sha256 is not the one {meta_path} commits "
                                      f"(files.{name}.sha256): the folder mixes two saves (an interrupted save?)")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(folder: str, name: str, field: str, source: str, record: Optional[Dict[str, Any]] = None) -> Any:
    """The JSON file ``name`` of ``folder`` (bounded, inside the folder), checked against its commit record."""
    path = file_in(folder, name, field, source)
    data = read_bytes(path, MAX_JSON_BYTES, "JSON file")
    if record is not None:
        check_record(path, data, len(data), record, os.path.join(folder, CONFIG_NAME))
    return parse_json(data, path)


# ------------------------------------------------------------------------------------------------ moefy.json
@dataclass
class Conversion:
    """One checked ``conversions`` entry of ``moefy.json``."""
    index: int
    path: str
    cls: str
    config: RoutingConfig
    num_experts: Optional[int] = None  # mixtures: E, S, D, G, chain; recorded blocks: ``fields``
    num_shared: int = 0
    input_dim: Optional[int] = None
    granularity: int = 1
    chain: Optional[Tuple[str, List[str]]] = None
    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def field(self) -> str:
        return f"conversions[{self.index}]"


@dataclass
class Meta:
    """A checked ``moefy.json``."""
    folder: str
    path: str
    version: int
    weights: str
    aliases: Dict[str, str]
    conversions: List[Conversion]
    files: Optional[Dict[str, Dict[str, Any]]]  # format 2: the commit record; format 1: None


def _module_path(value: Any, path: str, field: str, empty: bool = True) -> str:
    if not isinstance(value, str) or (value == "" and not empty) or (value and not all(
            _COMPONENT.fullmatch(c) and not c.startswith("__") for c in value.split("."))):
        raise bad(path, field, f"{_short(value)} is not a submodule path; allowed: names of letters, digits and _ "
                               f"joined by '.' (no '..', no __dunder__)" + (", or '' for the model itself" if empty
                                                                           else ""))
    return value


def _check_int(value: Any, path: str, field: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad(path, field, f"{_short(value)}; allowed: an integer >= {low}")
    return value


def _routing_config(value: Any, path: str, field: str) -> RoutingConfig:
    allowed = [f.name for f in dataclasses.fields(RoutingConfig)]
    if not isinstance(value, dict):
        raise bad(path, field, f"{_short(value)}; allowed: an object of RoutingConfig fields {allowed}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise bad(path, field, f"unknown option(s) {unknown}; allowed: {allowed}")
    try:
        return RoutingConfig(**value)
    except (TypeError, ValueError, OverflowError, RecursionError, KeyError, AttributeError) as err:
        raise bad(path, field, f"{type(err).__name__}: {err}") from None


def _conversion(i: int, entry: Any, path: str) -> Conversion:
    field = f"conversions[{i}]"
    if not isinstance(entry, dict):
        raise bad(path, field, f"{_short(entry)}; allowed: an object with path, class, config, ...")
    cls = entry.get("class")
    classes = ["ModuleMixture", "AttentionMixture"] + sorted(RECORDED)
    if not isinstance(cls, str) or cls not in classes:
        raise bad(path, f"{field}.class", f"{_short(cls)}; allowed: one of {classes}")
    expected = _MIXTURE_FIELDS if cls in ("ModuleMixture", "AttentionMixture") else \
        {"path": str, "class": str, "config": dict, **RECORDED[cls].fields}
    optional = _MIXTURE_OPTIONAL if expected is _MIXTURE_FIELDS else {}
    unknown = sorted(set(entry) - set(expected))
    missing = sorted(set(expected) - set(entry) - set(optional))
    if unknown or missing:
        raise bad(path, field, f"{'unknown field(s) ' + str(unknown) if unknown else 'missing field(s) ' + str(missing)}"
                               f"; a {cls} entry has {sorted(expected)}")
    for name, kind in expected.items():
        value = entry.get(name, optional.get(name))
        if isinstance(value, bool) or not isinstance(value, kind):
            raise bad(path, f"{field}.{name}", f"{_short(value)}; allowed: {_json_type(kind)}")
    conversion = Conversion(i, _module_path(entry["path"], path, f"{field}.path"), cls,
                            _routing_config(entry["config"], path, f"{field}.config"))
    if expected is not _MIXTURE_FIELDS:
        for name, allowed in RECORDED[cls].choices.items():
            if entry[name] not in allowed:
                raise bad(path, f"{field}.{name}", f"{_short(entry[name])}; allowed: one of {list(allowed)}")
        conversion.fields = {name: entry[name] for name in RECORDED[cls].fields}
        return conversion
    conversion.num_experts = _check_int(entry["num_experts"], path, f"{field}.num_experts", 1)
    conversion.num_shared = _check_int(entry["num_shared"], path, f"{field}.num_shared", 0)
    conversion.input_dim = _check_int(entry["input_dim"], path, f"{field}.input_dim", 1)
    conversion.granularity = _check_int(entry.get("granularity", 1), path, f"{field}.granularity", 1)
    chain = entry.get("chain")
    if chain is not None:
        if set(chain) != {"parent", "names"} or not isinstance(chain["names"], list) or not chain["names"]:
            raise bad(path, f"{field}.chain", f"{_short(chain)}; allowed: null or {{\"parent\": a submodule path, "
                                              f"\"names\": a non-empty list of submodule paths under it}}")
        parent = _module_path(chain["parent"], path, f"{field}.chain.parent")
        names = [_module_path(n, path, f"{field}.chain.names[{j}]", empty=False) for j, n in enumerate(chain["names"])]
        first = f"{parent}.{names[0]}" if parent else names[0]
        if first != conversion.path:
            raise bad(path, f"{field}.chain", f"the chain's first module {first!r} is not the entry's path "
                                              f"{conversion.path!r}; allowed: parent + '.' + names[0] == path")
        conversion.chain = (parent, names)
    return conversion


def read_meta(folder) -> Meta:
    """``moefy.json`` of ``folder``, every field checked (nothing else read)."""
    folder = check_folder(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.lexists(path):
        files = sorted(os.listdir(folder))
        how = (" It looks like a dense Hugging Face checkpoint (config.json): load it with from_pretrained, moefy it, "
               "and save the moefied model with moefy.save(model, folder) or its save_pretrained."
               if "config.json" in files else " Save a moefied model with moefy.save(model, folder).")
        if any(".moefy-tmp-" in f for f in files):
            how = " It holds the temporary files of an interrupted moefy.save and no complete checkpoint."
        raise FileNotFoundError(f"folder {folder!r} has no {CONFIG_NAME} (files: {files[:20]}), so it was not "
                                f"written by moefy.save.{how}")
    meta = read_json_file(folder, CONFIG_NAME, "file", path)
    if not isinstance(meta, dict):
        raise bad(path, "JSON", f"{_short(meta)}; allowed: an object with format_version, weights, conversions")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise bad(path, "format_version", f"format_version {_short(version)} (written by another moefy version?); "
                                          f"allowed: {list(READ_VERSIONS)} (this moefy writes {FORMAT_VERSION})")
    allowed = {"format_version", "weights", "aliases", "conversions"} | ({"files"} if version >= 2 else set())
    unknown, missing = sorted(set(meta) - allowed), sorted(allowed - set(meta) - {"aliases"})
    if unknown or missing:
        raise bad(path, "fields", f"{'unknown ' + str(unknown) if unknown else 'missing ' + str(missing)}; "
                                  f"format_version {version} has {sorted(allowed)}")
    weights = meta["weights"]
    file_in(folder, weights, "weights", path)
    if not weights.endswith(WEIGHT_SUFFIXES):
        raise bad(path, "weights", f"{_short(weights)}; allowed: a plain file name ending with {WEIGHT_SUFFIXES}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise bad(path, "aliases", f"{_short(aliases)}; allowed: an object {{key: stored key}} of strings")
    conversions = meta["conversions"]
    if not isinstance(conversions, list):
        raise bad(path, "conversions", f"{_short(conversions)}; allowed: a list of conversion objects")
    files = meta.get("files")
    if version >= 2:
        if not isinstance(files, dict) or weights not in files or not all(
                isinstance(r, dict) and isinstance(r.get("bytes"), int) and not isinstance(r["bytes"], bool)
                and set(r) in ({"bytes", "save_id"}, {"bytes", "sha256"})
                and all(isinstance(v, str) for k, v in r.items() if k != "bytes") for r in files.values()):
            raise bad(path, "files", f"{_short(files)}; allowed: {{file name: {{\"bytes\": n, \"save_id\" or "
                                     f"\"sha256\": string}}}}, naming the weights file {weights!r}")
    return Meta(folder, path, version, weights, aliases, [_conversion(i, e, path) for i, e in enumerate(conversions)],
                files)


# ------------------------------------------------------------------------------------------- weights header
@dataclass
class Header:
    """What the weights file holds, read without its data: ``{key: (dtype, shape)}``."""
    path: str
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]]
    state: Optional[Dict[str, torch.Tensor]] = None  # moefy.pt: memory-mapped tensors (read on first use)


def _safetensors_header(path: str, size: int) -> Tuple[Dict[str, Tuple[str, Tuple[int, ...]]], Dict[str, str]]:
    if size < 8:
        raise bad(path, "header", f"truncated: {size} bytes, less than the 8 bytes of a safetensors header length")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise bad(path, "header", f"declares {length} bytes, more than the file's {size - 8} bytes after the "
                                      f"length (truncated?) or the {MAX_HEADER_BYTES >> 20} MB moefy reads")
        header = parse_json(f.read(length), path)
    if not isinstance(header, dict):
        raise bad(path, "header", f"{_short(header)}; allowed: an object {{name: {{dtype, shape, data_offsets}}}}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(path, "header.__metadata__", f"{_short(metadata)}; allowed: an object of strings")
    tensors, spans = {}, []
    for key, info in header.items():
        field = f"header[{key!r}]"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(path, field, f"{_short(info)}; allowed: {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise bad(path, f"{field}.dtype", f"{_short(dtype)}; allowed: {sorted(_SAFETENSORS_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(path, f"{field}.shape", f"{_short(shape)}; allowed: a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise bad(path, f"{field}.data_offsets", f"{_short(offsets)}; allowed: [begin, end], 0 <= begin <= end")
        if offsets[1] - offsets[0] != math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]:
            raise bad(path, f"{field}.data_offsets", f"{offsets} span {offsets[1] - offsets[0]} bytes, but shape "
                                                     f"{shape} of {dtype} takes {math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]}")
        tensors[key] = (dtype, tuple(shape))
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise bad(path, "header", f"the tensors' data_offsets leave a gap or overlap at byte {end}")
        end = stop
    if end != size - 8 - length:
        raise bad(path, "header", f"truncated or padded: the tensors take {end} bytes, the file holds "
                                  f"{size - 8 - length} after the header")
    return tensors, metadata


def read_header(meta: Meta) -> Header:
    """The weights file's tensors (names, dtypes, shapes), read without their data and checked against the file's
    size and ``moefy.json``'s commit record (format 2)."""
    path = file_in(meta.folder, meta.weights, "weights", meta.path)
    size = os.path.getsize(path)
    record = meta.files[meta.weights] if meta.files is not None else None
    if meta.weights.endswith(".safetensors"):
        try:
            import safetensors.torch  # noqa: F401 (read_tensors needs it: fail before anything is built)
        except ImportError as err:
            raise ImportError(f"{path}: reading it needs the safetensors package: pip install safetensors "
                              f"(or moefy[save])") from err
        if record is not None and size != record["bytes"]:
            check_record(path, None, size, record, meta.path)  # truncated or replaced: before the header says so
        tensors, metadata = _safetensors_header(path, size)
        if record is not None:
            check_record(path, None, size, {k: v for k, v in record.items() if k != "save_id"}, meta.path)
            if "save_id" in record and metadata.get("moefy_save_id") != record["save_id"]:
                raise bad(path, "moefy_save_id", f"written by save {metadata.get('moefy_save_id')!r}, but "
                                                 f"{meta.path} commits save {record['save_id']!r}: the folder mixes "
                                                 f"two saves (a moefy.save interrupted after it replaced the "
                                                 f"weights); save again")
        return Header(path, tensors)
    if record is not None:
        check_record(path, None, size, record, meta.path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 (zip, pickle and storage errors alike: the file is not readable)
        raise bad(path, "file", f"not a torch.save file moefy reads ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise bad(path, "file", "allowed: a dict {name: tensor} saved by torch.save")
    return Header(path, {k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()}, state)


def read_tensors(header: Header) -> Dict[str, torch.Tensor]:
    """The weights (the data, after :func:`read_header` checked the file); each shape as the header declares."""
    if header.state is not None:
        return dict(header.state)
    from safetensors.torch import load_file  # read_header ran: the package is there (import checked by the caller)
    try:
        state = load_file(header.path)
    except Exception as err:  # noqa: BLE001 (safetensors' own errors)
        raise bad(header.path, "file", f"unreadable safetensors data ({type(err).__name__}: {err})") from None
    wrong = [k for k, t in state.items() if k not in header.tensors or tuple(t.shape) != header.tensors[k][1]]
    if wrong or len(state) != len(header.tensors):
        raise bad(header.path, "file", f"changed while it was read (tensors {wrong[:4]})")
    return state

