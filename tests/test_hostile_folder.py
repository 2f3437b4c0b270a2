"""A checkpoint folder is untrusted input: every hostile folder of issue 23 fails fast (< 2 s, < 200 MB), with a
one-line ValueError / FileNotFoundError naming the file and the field; no code from the folder runs; nothing
outside it is read; a failed ``moefy.load`` leaves the base model as it was; malformed ``moefy.json`` files (fuzz)
never give a bare KeyError / TypeError / RecursionError.

Run as a script for the before / after table: ``.venv/bin/python tests/test_hostile_folder.py [name part ...]``
(each case in its own process, stopped at 4 GB more or after 60 s).
"""
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import moefy
from conftest import ResidualMLPNet

SECONDS, MEGABYTES = 2.0, 200


def _llama():
    import transformers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    return moefy.moefy(transformers.LlamaForCausalLM(config), 4, k=2, target="mlp", route="tokens")


def _mixtral():
    import transformers
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    from moefy.hf import from_hf
    return from_hf(transformers.MixtralForCausalLM(config))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _moefy_json(edit):
    return lambda folder: _edit_json(folder / "moefy.json", edit)


def _conversion(**fields):
    return _moefy_json(lambda meta: meta["conversions"][0].update(fields))


def _recommit(folder: Path, name: str) -> None:
    """An attacker writes a commit record that matches: moefy.json names the edited file's size and sha256."""
    data = (folder / name).read_bytes()
    _edit_json(folder / "moefy.json", lambda meta: meta["files"].update(
        {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


def _config(**fields):
    def edit(folder: Path):
        _edit_json(folder / "config.json", lambda config: config.update(fields))
        _recommit(folder, "config.json")
    return edit


def _weights(name):
    return _moefy_json(lambda meta: meta.update(weights=name))


def _truncate(folder: Path) -> None:
    path = folder / "moefy.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(folder: Path) -> None:
    path = folder / "moefy.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 62) + path.read_bytes()[8:])


def _symlinked_weights(folder: Path) -> None:
    outside = folder.parent / (folder.name + "-outside.safetensors")
    shutil.copy(folder / "moefy.safetensors", outside)
    (folder / "moefy.safetensors").unlink()
    (folder / "moefy.safetensors").symlink_to(outside)


def _outside_weights(folder: Path) -> None:
    shutil.copy(folder / "moefy.safetensors", folder.parent / "outside.safetensors")
    _weights("../outside.safetensors")(folder)


def _dev_zero(name):
    def make(folder: Path):
        (folder / name).unlink()
        (folder / name).symlink_to("/dev/zero")
    return make


def _fifo(name):
    def make(folder: Path):
        (folder / name).unlink()
        os.mkfifo(folder / name)  # reading it would wait for a writer forever
    return make


def _huge_json(folder: Path) -> None:
    with open(folder / "moefy.json", "w") as f:
        f.write(" " * (40 << 20) + "{}")


def _remote_code(folder: Path) -> None:
    _config(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                         "AutoModelForCausalLM": "evil.EvilModel"})(folder)
    (folder / "evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")


# name: (base model, mutation of a copy of its saved folder, (file, field) the error must name)
CASES = {
    "num_experts=100000000": ("net", _conversion(num_experts=100_000_000), ("moefy.json", "num_experts")),
    "num_experts=1e8": ("net", _conversion(num_experts=1e8), ("moefy.json", "num_experts")),
    "input_dim=400000000": ("net", _conversion(input_dim=400_000_000), ("moefy.json", "input_dim")),
    "null_experts constant=1e8": ("net", _moefy_json(lambda m: m["conversions"][0]["config"].update(
        null_experts={"constant": 100_000_000})), ("moefy.json", "null_experts")),
    "weights=/etc/passwd": ("net", _weights("/etc/passwd"), ("moefy.json", "weights")),
    "weights=../outside": ("net", _outside_weights, ("moefy.json", "weights")),
    "weights=sub/x": ("net", _weights("sub/moefy.safetensors"), ("moefy.json", "weights")),
    "weights symlink out": ("net", _symlinked_weights, ("moefy.safetensors", "symlink")),
    "truncated weights": ("net", _truncate, ("moefy.safetensors", "truncated")),
    "header length 2**62": ("net", _huge_header, ("moefy.safetensors", "header")),
    "moefy.json nested 1e5": ("net", lambda f: (f / "moefy.json").write_text("[" * 100_000 + "]" * 100_000),
                              ("moefy.json", "nest")),
    "moefy.json -> /dev/zero": ("net", _dev_zero("moefy.json"), ("moefy.json", "symlink")),
    "moefy.json a FIFO": ("net", _fifo("moefy.json"), ("moefy.json", "regular file")),
    "moefy.json 40 MB": ("net", _huge_json, ("moefy.json", "MB")),
    "aliases to a missing key": ("net", _moefy_json(lambda m: m.update(aliases={"x": "nope"})),
                                 ("moefy.json", "aliases")),
    "vocab_size=20000000": ("llama", _config(vocab_size=20_000_000), ("config.json", "vocab_size")),
    "num_hidden_layers=10000000": ("llama", _config(num_hidden_layers=10_000_000),
                                   ("config.json", "num_hidden_layers")),
    "architectures=pipeline": ("llama", _config(architectures=["pipeline"]), ("config.json", "architectures")),
    "architectures=TrainingArguments": ("llama", _config(architectures=["TrainingArguments"]),
                                        ("config.json", "architectures")),
    "architectures=TextStreamer": ("llama", _config(architectures=["TextStreamer"]),
                                   ("config.json", "architectures")),
    "auto_map + evil.py": ("llama", _remote_code, ("config.json", "model_type")),
    "config.json edited after the save": ("llama", lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"')),
        ("config.json", "sha256")),  # same size, other outputs
    "config.json -> /dev/zero": ("llama", _dev_zero("config.json"), ("config.json", "symlink")),
    "config.json a FIFO": ("llama", _fifo("config.json"), ("config.json", "regular file")),
    "num_local_experts=100000000": ("mixtral", _config(num_local_experts=100_000_000),
                                    ("config.json", "num_local_experts")),
}


def make_folders(root: Path, only=None):
    """Every case's folder under ``root`` (or the one named ``only``): ``{name: (base model, folder)}``."""
    torch.manual_seed(0)
    bases = {"net": lambda: moefy.moefy(ResidualMLPNet(), 4, k=2, target="blocks.*"), "llama": _llama,
             "mixtral": _mixtral}
    for kind, model in bases.items():
        moefy.save(model(), root / "base" / kind)
    folders = {}
    for i, (name, (kind, mutate, _)) in enumerate(CASES.items()):
        if only is not None and name != only:
            continue
        folder = root / f"case{i}" / kind
        shutil.copytree(root / "base" / kind, folder)
        mutate(folder)
        folders[name] = (kind, folder)
    return folders


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0), so that the next peak is the next case's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _load(kind, folder):
    if kind == "net":
        return moefy.load(ResidualMLPNet(), folder)
    from moefy.hf import load
    return load(folder)


def run_cases(root: Path, limit_seconds: int = 0, only=None):
    """Load every case once in this process: ``{name: (error type, one-line message, seconds, peak MB)}``. The
    peak is this process's peak RSS during the load (reset before it where Linux allows, else the peak so far: an
    upper bound) less its RSS before."""
    folders = make_folders(root, only)
    _load("llama", root / "base" / "llama")  # the lazy imports of transformers happen here, not in a case
    _load("mixtral", root / "base" / "mixtral")
    results = {}
    for name, (kind, folder) in folders.items():
        exact = _reset_peak()
        before = _rss()
        start = time.perf_counter()
        if limit_seconds:
            signal.alarm(limit_seconds)
        try:
            _load(kind, folder)
            outcome = ("loaded", "")
        except BaseException as err:  # noqa: B902 (the table reports whatever happened)
            outcome = (type(err).__name__, str(err))
        finally:
            signal.alarm(0)
        seconds = time.perf_counter() - start
        peak = (_peak() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - before
        results[name] = (*outcome, seconds, max(peak, 0) / 2 ** 20)
    return results


CHILD = """
import json, resource, sys
sys.path.insert(0, {tests!r})
import test_hostile_folder as h
if {limit}:  # the table's run of today's main: stop a case at a few GB or after {limit} s
    import signal
    def _timeout(*_):
        raise TimeoutError("ran past {limit} s")
    signal.signal(signal.SIGALRM, _timeout)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + (4 << 30), resource.RLIM_INFINITY))
print("RESULT " + json.dumps(h.run_cases(h.Path({root!r}), {limit}, {only!r})))
"""


def run_child(root: Path, limit_seconds: int = 0, only=None):
    code = CHILD.format(tests=str(Path(__file__).parent), root=str(root), limit=limit_seconds, only=only)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    if done.returncode != 0:
        raise AssertionError(done.stderr[-3000:])
    return json.loads(done.stdout[done.stdout.rindex("RESULT ") + len("RESULT "):]), done.stdout


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("hostile")
    results, stdout = run_child(root)
    assert "Do you wish to run the custom code" not in stdout
    assert not list(root.rglob("RAN")), "code from the folder ran"
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_folder_fails_fast_and_names_the_file_and_the_field(outcomes, name):
    kind, message, seconds, megabytes = outcomes[name]
    file, field = CASES[name][2]
    assert kind in ("ValueError", "FileNotFoundError"), (kind, message)
    assert "\n" not in message and file in message and field in message, message
    assert seconds < SECONDS and megabytes < MEGABYTES, (seconds, megabytes)


# ------------------------------------------------------------------------------------------ in this process
def _saved_net(folder: Path):
    torch.manual_seed(0)
    model = moefy.moefy(ResidualMLPNet(), 4, k=2, target="blocks.*")
    moefy.save(model, folder)
    return model


def _snapshot(model):
    return [(name, m) for name, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    modules, state = snapshot
    now = model.state_dict()
    return [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules] and \
        now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_a_failed_load_leaves_the_base_model_as_it_was(tmp_path, monkeypatch):
    """A truncated weights file (caught before anything is built), and a failure after the conversion started
    (load_state_dict raising): the caller's base keeps its modules, by identity, and its weights."""
    _saved_net(tmp_path / "truncated")
    _truncate(tmp_path / "truncated")
    base = ResidualMLPNet()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match="moefy.safetensors: size: truncated"):
        moefy.load(base, tmp_path / "truncated")
    assert _unchanged(base, snapshot)

    _saved_net(tmp_path / "late")
    with monkeypatch.context() as m:
        m.setattr(nn.Module, "load_state_dict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("late")))
        with pytest.raises(RuntimeError, match="late"):
            moefy.load(base, tmp_path / "late")
    assert _unchanged(base, snapshot)
    assert isinstance(moefy.load(base, tmp_path / "late").blocks[0], moefy.ModuleMixture)  # and it still loads


def test_remote_code_never_runs_and_never_prompts(tmp_path, monkeypatch, caplog):
    """config.json's auto_map with a .py beside it: with an unknown model_type the load is refused; with a
    built-in one the model is built from transformers' own class, the auto_map dropped. No prompt either way."""
    pytest.importorskip("transformers")
    from moefy.hf import load
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("moefy.hf.load prompted"))
    model = _llama()
    moefy.save(model, tmp_path / "evil")
    _remote_code(tmp_path / "evil")
    with pytest.raises(ValueError, match=r"config.json: model_type: 'evil' is not a model type"):
        load(tmp_path / "evil")
    moefy.save(model, tmp_path / "known")
    (tmp_path / "known" / "evil.py").write_text((tmp_path / "evil" / "evil.py").read_text())
    _config(auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})(tmp_path / "known")
    loaded = load(tmp_path / "known")
    assert type(loaded).__name__ == "LlamaForCausalLM" and type(loaded).__module__.startswith("transformers.")
    assert getattr(loaded.config, "auto_map", None) is None and "not run" in caplog.text
    assert not list(tmp_path.rglob("RAN"))


def _mutations(meta):
    """Malformed versions of a valid moefy.json: every field of the top level and of conversions[0] (its config
    included) deleted or replaced by each of: wrong types, huge / negative numbers, deep nesting, paths."""
    values = [None, True, -1, 0, 1.5, 10 ** 30, 1e308, "x", "", "../x", "/etc/passwd", [], {}, [1, "a"],
              {"a": {"b": None}}, "<deep>"]  # "<deep>": 50,000 nested lists
    fields = [()] + [(k,) for k in meta] + [("conversions", 0, k) for k in meta["conversions"][0]] + \
        [("conversions", 0, "config", k) for k in meta["conversions"][0]["config"]]
    for field in fields:
        for value in values + ["<delete>"]:
            if value == "<delete>" and not field:
                continue
            data = json.loads(json.dumps(meta))
            *parents, last = field or (None,)
            node = data
            for p in parents:
                node = node[p]
            if not field:
                data = value
            elif value == "<delete>":
                del node[last]
            else:
                node[last] = value
            yield field, value, data
    for raw in (b"", b"{", b"\xff\xfe", b"[]", b'{"format_version": 2}', b"NaN", b"1" * 5000):
        yield ("raw",), raw, raw


def test_fuzzed_moefy_json_gives_a_named_value_error_never_a_bare_one(tmp_path):
    """Over 500 malformed moefy.json files: each loads (a mutation that is still valid) or raises a one-line
    ValueError / FileNotFoundError naming the file; never KeyError, TypeError, IndexError, RecursionError."""
    folder = tmp_path / "fuzz"
    _saved_net(folder)
    valid = json.loads((folder / "moefy.json").read_text())
    refused, bare = 0, []
    for field, value, data in _mutations(valid):
        text = data if isinstance(data, bytes) else \
            json.dumps(data).replace('"<deep>"', "[" * 50_000 + "]" * 50_000).encode()
        (folder / "moefy.json").write_bytes(text)
        try:
            moefy.load(ResidualMLPNet(), folder)
        except (ValueError, FileNotFoundError) as err:
            refused += 1
            if str(folder / "moefy.json") not in str(err) and str(folder) not in str(err) or "\n" in str(err):
                bare.append((field, str(value)[:20], str(err)[:200]))
        except BaseException as err:  # noqa: B902 (what the test is about)
            bare.append((field, str(value)[:20], f"{type(err).__name__}: {str(err)[:200]}"))
    assert not bare, f"{len(bare)} bare errors, e.g. {bare[:5]}"
    assert refused > 500


if __name__ == "__main__":  # each case in its own process, stopped at 4 GB more or after 60 s
    import tempfile
    for name in [n for n in CASES if not sys.argv[1:] or any(a in n for a in sys.argv[1:])]:
        with tempfile.TemporaryDirectory() as tmp:
            results, stdout = run_child(Path(tmp), limit_seconds=60, only=name)
            ran = bool(list(Path(tmp).rglob("RAN")))
        kind, message, seconds, megabytes = results[name]
        prompt = " (prompted: Do you wish to run the custom code?)" if "Do you wish" in stdout else ""
        first = message.splitlines()[0][:160] if message else ""
        ran_note = " CODE RAN" if ran else ""
        print(f"| {name} | {seconds:.2f} s | {megabytes:.0f} MB | {kind}: {first}{prompt}{ran_note} |")
