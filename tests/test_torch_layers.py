"""torch's own transformer layers with a mixture inside (moefy.convert.torch_layers): in eval, under no_grad /
inference_mode, batch_first or not, with or without a padding mask, they compute torch's slow path, never the fused
fast path that reads the replaced modules' weights; targets torch reads directly are refused at conversion."""
import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn

import moefy
from moefy.convert.torch_layers import SlowPathTransformerEncoder, SlowPathTransformerEncoderLayer

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's dense path

D, HEADS, FF, B, S = 8, 2, 16, 3, 5
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": contextlib.nullcontext}


@contextlib.contextmanager
def slow_path():
    """torch's own switch for its fast paths (process-wide, so only the references use it, and restore it)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _inputs(batch_first):
    g = torch.Generator().manual_seed(1)
    x, mem = torch.randn(B, S, D, generator=g), torch.randn(B, S + 1, D, generator=g)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 3:] = True  # sample 0 has 3 real tokens, padded on the right (what the nested-tensor path packs)
    if not batch_first:
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    return x, mem, pad


def _encoder_layer(batch_first):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first).eval()


def _decoder_layer(batch_first):
    torch.manual_seed(0)
    return nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first).eval()


def _encoder(batch_first, layer=None):
    torch.manual_seed(0)
    return nn.TransformerEncoder(layer or _encoder_layer(batch_first), 2, enable_nested_tensor=batch_first).eval()


def _moefied(dense, target, expert_noise=0.0):
    torch.manual_seed(2)
    if target is None:
        return moefy.moefy(dense, 4, k=2, expert_noise=expert_noise).eval()
    return moefy.moefy(copy.deepcopy(dense), 4, k=2, target=target, expert_noise=expert_noise).eval()


def _check_eval(model, reference, call, check_dense_at_init):
    """``call(model)`` in eval under every grad mode, with and without a padding mask: equal to the same model
    with torch's fast paths off and, for a mixture exact at init, to the dense module's slow path."""
    for name, context in CONTEXTS.items():
        for masked in (False, True):
            with context():
                out = call(model, masked)
                with slow_path():
                    expected = call(model, masked)
                    dense = call(reference, masked)
            torch.testing.assert_close(out, expected, msg=lambda m: f"{name}, masked={masked}: {m}")
            if check_dense_at_init:
                torch.testing.assert_close(out, dense, msg=lambda m: f"{name}, masked={masked} vs dense: {m}")


def _call_encoder(batch_first):
    x, _, pad = _inputs(batch_first)
    return lambda m, masked: m(x, src_key_padding_mask=pad if masked else None)


def _call_decoder(batch_first):
    x, mem, pad = _inputs(batch_first)
    return lambda m, masked: m(x, mem, tgt_key_padding_mask=pad if masked else None,
                               memory_key_padding_mask=torch.nn.functional.pad(pad, (0, 1)) if masked else None)


# ------------------------------------------------------------------------------------------ one layer
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("target", ["linear1", "linear2", "self_attn", "norm1", None])
def test_encoder_layer_in_eval_is_the_slow_path(target, batch_first):
    if target is None and not batch_first:
        pytest.skip("a whole layer routes per sample: refused with batch_first=False (test_whole_layer_refusals)")
    dense = _encoder_layer(batch_first)
    call = _call_encoder(batch_first)
    for noise in (0.0, 0.3):  # exact copies (= the dense layer), then experts that differ
        model = _moefied(dense, target, expert_noise=noise)
        if target is not None:
            assert type(model) is SlowPathTransformerEncoderLayer
            assert isinstance(model, nn.TransformerEncoderLayer) and model.activation_relu_or_gelu == 0
        _check_eval(model, dense, call, check_dense_at_init=noise == 0.0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("target", ["linear1", "linear2", "self_attn", "multihead_attn", "norm3", None])
def test_decoder_layer_in_eval_is_the_slow_path(target, batch_first):
    if target is None and not batch_first:
        pytest.skip("a whole layer routes per sample: refused with batch_first=False")
    dense = _decoder_layer(batch_first)
    for noise in (0.0, 0.3):
        _check_eval(_moefied(dense, target, expert_noise=noise), dense, _call_decoder(batch_first),
                    check_dense_at_init=noise == 0.0)


def test_a_trained_layer_still_evaluates_on_the_slow_path():
    """The issue's run: moefy(TransformerEncoderLayer, target="linear1") trains, then eval must not crash."""
    dense = _encoder_layer(True)
    model = _moefied(dense, "linear1").train()
    x, _, pad = _inputs(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (model(x).square().mean() + moefy.aux_loss(model)).backward()
        opt.step()
    model.eval()
    _check_eval(model, dense, _call_encoder(True), check_dense_at_init=False)
    assert not torch.allclose(model(x), dense(x))  # it trained: a comparison that could fail


# ------------------------------------------------------------------------------------------ stacks
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("target", ["linear1", "linear2", "self_attn", "norm2", "layers.1"])
def test_encoder_stack_in_eval_is_the_slow_path(target, batch_first):
    if target == "layers.1" and not batch_first:
        pytest.skip("a whole layer routes per sample: refused with batch_first=False")
    dense = _encoder(batch_first)
    model = _moefied(dense, target)
    assert type(model) is SlowPathTransformerEncoder and not model.use_nested_tensor
    assert model.__dict__["use_nested_tensor"] is batch_first  # torch's own flag, kept for unmoefy
    _check_eval(model, dense, _call_encoder(batch_first), check_dense_at_init=True)


def test_encoder_stack_keeps_padded_positions_of_the_slow_path():
    """The nested-tensor path writes 0 at padded positions; the slow path (and the moefied stack) does not."""
    dense = _encoder(True)
    x, _, pad = _inputs(True)
    with torch.no_grad():
        fast = dense(x, src_key_padding_mask=pad)
        with slow_path():
            slow = dense(x, src_key_padding_mask=pad)
        moe = _moefied(dense, "linear1")(x, src_key_padding_mask=pad)
    assert fast[0, 3:].abs().max() == 0 and slow[0, 3:].abs().min() > 0
    torch.testing.assert_close(moe, slow)


def test_encoder_built_around_a_moefied_layer_skips_its_nested_path():
    layer = _moefied(_encoder_layer(True), "linear1")
    with pytest.warns(UserWarning, match="activation_relu_or_gelu was not True"):
        stack = nn.TransformerEncoder(layer, 2).eval()  # torch's own check of the layer it is built from
    assert type(stack) is nn.TransformerEncoder and stack.use_nested_tensor is False
    dense = _encoder(True)
    dense.layers.load_state_dict(stack.layers.state_dict(), strict=False)  # the same copies' dense weights
    x, _, pad = _inputs(True)
    with torch.no_grad(), slow_path():
        expected = stack(x, src_key_padding_mask=pad)
    with torch.no_grad():
        torch.testing.assert_close(stack(x, src_key_padding_mask=pad), expected)


def test_transformer_and_decoder_stack():
    torch.manual_seed(0)
    dense = nn.Transformer(D, HEADS, 2, 2, FF, dropout=0.0, batch_first=True).eval()
    x, mem, pad = _inputs(True)
    model = _moefied(dense, ["linear1", "self_attn"])
    assert all(type(m) is SlowPathTransformerEncoderLayer for m in model.encoder.layers)
    assert type(model.encoder) is SlowPathTransformerEncoder and type(model.decoder) is nn.TransformerDecoder
    _check_eval(model, dense, lambda m, masked: m(mem, x, src_key_padding_mask=torch.nn.functional.pad(pad, (0, 1))
                                                  if masked else None), check_dense_at_init=True)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("build, target", [
    (lambda: _encoder_layer(True), "self_attn.out_proj"),
    (lambda: _decoder_layer(False), "multihead_attn.out_proj"),
    (lambda: nn.MultiheadAttention(D, HEADS), "out_proj"),
    (lambda: _encoder(True), ["linear1", "layers.1.self_attn.out_proj"]),
])
def test_out_proj_of_attention_is_refused_and_nothing_changes(build, target):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"out_proj.*nn.MultiheadAttention never calls out_proj.*whole attention"):
        moefy.moefy(model, 4, target=target)
    assert not moefy.moe_blocks(model) and type(model) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                                                           nn.MultiheadAttention, nn.TransformerEncoder)
    assert model.state_dict().keys() == before.keys()


def test_whole_layer_refusals():
    for stack, target in ((_encoder(True), nn.TransformerEncoderLayer),
                          (nn.TransformerDecoder(_decoder_layer(True), 2), "layers.0")):
        with pytest.raises(ValueError, match=r"target 'layers.0': Transformer(En|De)coder reads "
                                             r"layers\[0\].self_attn.batch_first"):
            moefy.moefy(stack, 4, target=target)
        assert not moefy.moe_blocks(stack)
    with pytest.raises(ValueError, match=r"route='samples' needs the batch on dim 0.*batch_first=False"):
        moefy.moefy(_encoder_layer(False), 4)


def test_subclass_with_torchs_fast_path_is_refused():
    class MyLayer(nn.TransformerEncoderLayer):
        pass

    with pytest.raises(TypeError, match=r"'linear1' sits in MyLayer, a subclass of nn.TransformerEncoderLayer"):
        moefy.moefy(MyLayer(D, HEADS, FF, batch_first=True), 4, target="linear1")


# ------------------------------------------------------------------------------------------ round trips
def test_unmoefy_gives_torchs_classes_and_fast_path_back():
    dense = _encoder(True)
    model = moefy.unmoefy(_moefied(dense, "linear1"))
    assert type(model) is nn.TransformerEncoder and model.use_nested_tensor is True
    assert all(type(m) is nn.TransformerEncoderLayer and m.activation_relu_or_gelu == 1 for m in model.layers)
    x, _, pad = _inputs(True)
    with torch.no_grad():
        out, expected = model(x, src_key_padding_mask=pad), dense(x, src_key_padding_mask=pad)
    assert out[0, 3:].abs().max() == 0  # the nested-tensor fast path runs again
    torch.testing.assert_close(out, expected)


def test_copies_pickles_and_save_load_keep_the_slow_path(tmp_path):
    dense = _encoder(True)
    model = _moefied(dense, "linear1", expert_noise=0.3)
    x, _, pad = _inputs(True)
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=pad)
    moefy.save(model, str(tmp_path))
    assert model.state_dict().keys() == moefy.moefy(copy.deepcopy(dense), 4, target="linear1").state_dict().keys()
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), moefy.load(copy.deepcopy(dense), tmp_path)):
        assert type(other) is SlowPathTransformerEncoder
        assert type(other.layers[1]) is SlowPathTransformerEncoderLayer
        with torch.no_grad():
            torch.testing.assert_close(other.eval()(x, src_key_padding_mask=pad), expected)
