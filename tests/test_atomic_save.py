"""moefy.save is crash-safe: an OSError (ENOSPC) injected at every file operation of a save over an existing
checkpoint, or a SIGKILL at a random point, leaves a folder that loads as the old checkpoint exactly (or as the new
one, once its moefy.json is committed) or fails loudly naming the file; never the weights of one save with the
description of another. A save removes the dense weights a plain from_pretrained / Trainer would load instead."""
import builtins
import errno
import json
import os
import random
import shutil
import signal
import sys
import time

import pytest
import torch

import moefy
from conftest import ResidualMLPNet
from moefy.convert import writer


def _net(seed, k):
    """Same shapes, other weights and routing (k): a mix of two saves would load without a shape error."""
    torch.manual_seed(seed)
    return moefy.moefy(ResidualMLPNet(), 4, k=k, target="blocks.*", expert_noise=0.1)


def _fingerprint(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [b.config for b in moefy.moe_blocks(model)])


def _is(model, fingerprint):
    state, configs = fingerprint
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in state) and \
        [b.config for b in moefy.moe_blocks(model)] == configs


class Faults:
    """Counts every file operation of a save; raises OSError(ENOSPC) at the ``fail_at``-th (a write fails half-way:
    half its bytes reach the disk). ``committed``: moefy.json was renamed into place."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, self.committed, self.ops = 0, fail_at, False, []
        self.real_open, real_replace = builtins.open, os.replace
        for module, name in ((os, "unlink"), (os, "fsync"), (os, "open")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))
        monkeypatch.setattr(os, "replace", self._wrap(self._replace(real_replace), "replace"))
        monkeypatch.setattr(builtins, "open", self._open)
        monkeypatch.setattr(writer, "_write_weights", self._weights(writer._write_weights))

    def hit(self, name) -> bool:
        self.calls += 1
        self.ops.append(name)
        return self.calls == self.fail_at

    def _error(self):
        return OSError(errno.ENOSPC, "No space left on device (injected)")

    def _wrap(self, real, name):
        def op(*args, **kwargs):
            if self.hit(name):
                raise self._error()
            return real(*args, **kwargs)
        return op

    def _replace(self, real):
        def replace(src, dst):
            real(src, dst)
            self.committed |= os.path.basename(dst) == "moefy.json"
        return replace

    def _weights(self, real):
        def write(tensors, path, **kwargs):
            if self.hit("write weights"):
                real(tensors, path, **kwargs)
                with self.real_open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                raise self._error()
            return real(tensors, path, **kwargs)
        return write

    def _open(self, file, mode="r", *args, **kwargs):
        if self.hit(f"open {mode}"):
            raise self._error()
        f = self.real_open(file, mode, *args, **kwargs)
        return _Writes(f, self) if any(c in mode for c in "wxa+") else f


class _Writes:
    """A file whose ``write`` counts as an operation (and fails half-way at its turn)."""

    def __init__(self, f, faults):
        self._f, self._faults = f, faults

    def write(self, data):
        if self._faults.hit("write"):
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise self._faults._error()
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _outcome(load, folder, old, new, saved):
    """"old" / "new": the folder loads as that checkpoint exactly; "loud": a ValueError / FileNotFoundError naming
    a file of the folder. Anything else fails the test."""
    try:
        model = load(folder)
    except (ValueError, FileNotFoundError) as err:
        assert str(folder) in str(err) and "\n" not in str(err), err
        return "loud"
    if _is(model, old):
        return "old"
    assert saved and _is(model, new), "the folder loads as neither checkpoint: a mix"
    return "new"


def _sweep(tmp_path, monkeypatch, write_old, new_model, load, folder_check=None):
    """Save ``new_model`` over the old checkpoint with a fault at each file operation in turn."""
    clean = tmp_path / "clean"
    old = write_old(clean)
    with monkeypatch.context() as m:
        counter = Faults(m)
        moefy.save(new_model, clean)
    new = _fingerprint(new_model)
    assert _outcome(load, clean, old, new, saved=True) == "new"
    outcomes, template = [], tmp_path / "old"
    write_old(template)
    for i in range(1, counter.calls + 1):
        folder = tmp_path / f"fault{i}"
        shutil.copytree(template, folder)
        with monkeypatch.context() as m:
            faults = Faults(m, fail_at=i)
            with pytest.raises(OSError, match="injected"):
                moefy.save(new_model, folder)
                raise AssertionError(f"no OSError from the fault at {counter.ops[i - 1]!r} (operation {i})")
        outcome = _outcome(load, folder, old, new, saved=faults.committed)
        assert outcome != "new" or faults.committed  # the new checkpoint only once moefy.json is renamed in
        outcomes.append((counter.ops[i - 1], outcome))
        if folder_check is not None:
            folder_check(folder, outcome)
        if not faults.committed:  # the failed save's temporary files are gone (they were never renamed)
            assert not [n for n in os.listdir(folder) if ".moefy-tmp-" in n]
    assert moefy.save(new_model, folder) and _outcome(load, folder, old, new, saved=True) == "new"
    assert not [n for n in os.listdir(folder) if ".moefy-tmp-" in n]
    return outcomes


def _old_net(folder):
    model = _net(0, k=1)
    moefy.save(model, folder)
    return _fingerprint(model)


def test_a_fault_at_any_file_operation_leaves_the_old_checkpoint_or_a_loud_error(tmp_path, monkeypatch):
    outcomes = _sweep(tmp_path, monkeypatch, _old_net, _net(1, k=2), lambda f: moefy.load(ResidualMLPNet(), f))
    kinds = [o for _, o in outcomes]
    assert len(outcomes) >= 12 and {"old", "new"} <= set(kinds)
    assert kinds[0] == "old" and kinds[-1] == "new", outcomes  # every fault before the first rename: the old one
    ops = [op for op, _ in outcomes]
    assert "write weights" in ops and "write" in ops and "replace" in ops and "fsync" in ops


def test_without_safetensors_moefy_pt_is_crash_safe_too(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    outcomes = _sweep(tmp_path, monkeypatch, _old_net, _net(1, k=2), lambda f: moefy.load(ResidualMLPNet(), f))
    assert sorted(os.listdir(tmp_path / "clean")) == ["moefy.json", "moefy.pt"]
    assert {"old", "new"} <= {o for _, o in outcomes}


def test_a_folder_of_format_1_is_never_mixed_with_new_weights(tmp_path, monkeypatch):
    """A moefy.json without a commit record (format 1) cannot tell the new weights from its own: a save removes it
    before it replaces the weights, so an interrupted save fails loudly (no moefy.json) instead."""
    def old_v1(folder):
        fingerprint = _old_net(folder)
        meta = json.loads((folder / "moefy.json").read_text())
        del meta["files"]
        (folder / "moefy.json").write_text(json.dumps({**meta, "format_version": 1}))
        return fingerprint
    outcomes = _sweep(tmp_path, monkeypatch, old_v1, _net(1, k=2), lambda f: moefy.load(ResidualMLPNet(), f))
    assert {"old", "loud", "new"} == {o for _, o in outcomes}


def _llama(seed, k):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(seed)
    return moefy.moefy(transformers.LlamaForCausalLM(config), 4, k=k, target="mlp", route="tokens",
                       expert_noise=0.1)


def _dense_refused(folder):
    import transformers
    with pytest.raises((ValueError, OSError)):
        transformers.LlamaForCausalLM.from_pretrained(folder)


def test_hf_folders_are_crash_safe_and_never_load_as_a_stale_dense_model(tmp_path, monkeypatch):
    """Over a moefied Llama's checkpoint: moefy.hf.load (config.json is in the commit record) gives the old one,
    the new one or a loud error; a dense from_pretrained always refuses; no dense weights are left for Trainer."""
    from moefy.hf import load

    def old_hf(folder):
        model = _llama(0, k=1)
        moefy.save(model, folder)
        return _fingerprint(model)

    seen = set()

    def check(folder, outcome):  # config.json always names moefy's weights file, which from_pretrained refuses
        assert json.loads((folder / "config.json").read_text())["transformers_weights"] == writer.NOT_DENSE
        assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(folder))
        if outcome not in seen:  # and a real from_pretrained, once per outcome (it takes 0.1 s)
            seen.add(outcome)
            _dense_refused(folder)
    outcomes = _sweep(tmp_path, monkeypatch, old_hf, _llama(1, k=2), load, check)
    assert {"old", "loud", "new"} == {o for _, o in outcomes}


def test_a_save_removes_the_dense_weights_from_pretrained_would_load(tmp_path):
    """Issue 23, item 2: a dense (sharded) checkpoint saved into the folder before is removed, so neither a plain
    from_pretrained nor Trainer (which prefers model.safetensors to the index) loads stale dense weights."""
    import transformers
    dense = transformers.LlamaForCausalLM(_llama(0, 1).config)
    dense.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    dense.save_pretrained(tmp_path / "whole")
    shards = [n for n in os.listdir(tmp_path / "sharded") if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors" in os.listdir(tmp_path / "whole")
    model = _llama(1, k=2)
    for name in ("sharded", "whole"):
        moefy.save(model, tmp_path / name)
        assert sorted(os.listdir(tmp_path / name)) == ["config.json", "generation_config.json",  # not weights: kept
                                                       "model.safetensors.index.json", "moefy.json",
                                                       "moefy.safetensors"]
        _dense_refused(tmp_path / name)
        assert _is(moefy.hf.load(tmp_path / name), _fingerprint(model))
    torch.save({}, tmp_path / "whole" / "pytorch_model.bin")  # and the other format's weights and index
    (tmp_path / "whole" / "pytorch_model.bin.index.json").write_text("{}")
    moefy.save(model, tmp_path / "whole")
    assert "pytorch_model.bin" not in os.listdir(tmp_path / "whole")
    assert "pytorch_model.bin.index.json" not in os.listdir(tmp_path / "whole")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="a real kill needs fork")
def test_a_sigkill_at_random_points_of_saves(tmp_path):
    """A child saves two checkpoints in turn into one folder until it is SIGKILLed at a random moment; each time
    the folder loads as one of them exactly, or fails loudly; a later save cleans up what the kills left."""
    models = [_net(0, k=1), _net(1, k=2)]
    prints = [_fingerprint(m) for m in models]
    folder = tmp_path / "ckpt"
    moefy.save(models[0], folder)
    rng, outcomes = random.Random(0), []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:  # the child: save, save, ... until killed
            try:
                i = 0
                while True:
                    moefy.save(models[i % 2], folder)
                    i += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.005, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            loaded = moefy.load(ResidualMLPNet(), folder)
        except (ValueError, FileNotFoundError) as err:
            assert str(folder) in str(err)
            outcomes.append("loud")
            continue
        which = [i for i, p in enumerate(prints) if _is(loaded, p)]
        assert which, "the folder loads as neither checkpoint: a mix"
        outcomes.append(which[0])
    moefy.save(models[1], folder)
    assert _is(moefy.load(ResidualMLPNet(), folder), prints[1])
    assert sorted(os.listdir(folder)) == ["moefy.json", "moefy.safetensors"]


def test_a_save_removes_what_safetensors_left_when_killed_inside_save_file(tmp_path):
    """safetensors' save_file writes through a ``.tmpXXXXXX`` of its own in the folder; a kill inside it leaves that
    file (as big as the weights), which the next save removes. Other hidden files are the user's: kept."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in (".tmpAb12Cd", ".tmp0xYz9Q"):  # what a SIGKILL inside save_file leaves
        (folder / name).write_bytes(b"\0" * 64)
    for name in (".tmpnotes.txt", ".tmp12345", "tmpAb12Cd"):  # not safetensors' pattern
        (folder / name).write_bytes(b"mine")
    moefy.save(_net(0, k=1), folder)
    assert sorted(os.listdir(folder)) == [".tmp12345", ".tmpnotes.txt", "moefy.json", "moefy.safetensors", "tmpAb12Cd"]
