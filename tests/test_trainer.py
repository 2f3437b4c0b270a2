"""A plain ``transformers.Trainer`` on a moefied Llama: ``resume_from_checkpoint`` continues to exactly the weights
of an uninterrupted run, ``load_best_model_at_end`` loads the best checkpoint's weights, and a dense
``from_pretrained`` of a checkpoint still fails loudly."""
import json
import logging
import os

import pytest
import torch

import moefy

transformers = pytest.importorskip("transformers")

STEPS, BATCH, LENGTH, VOCAB = 4, 4, 8, 64


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
    model = moefy.moefy(transformers.LlamaForCausalLM(config), 4, k=2, target="mlp",
                        aux_criterion={"switch": 0.01})
    moefy.hf.include_aux_loss(model)
    return model


def _data(n=STEPS * BATCH, seed=1):
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))  # (N, L)
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(model, folder, compute_metrics=None, **options):
    args = transformers.TrainingArguments(
        output_dir=str(folder), use_cpu=True, report_to=[], save_strategy="steps", save_steps=2, max_steps=STEPS,
        per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH, learning_rate=1e-2, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, logging_strategy="no", **options)
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data(8, seed=2),
                                compute_metrics=compute_metrics)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(state, other):
    assert state.keys() == other.keys()
    different = [k for k in state if not torch.equal(state[k], other[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_resume_from_checkpoint_continues_exactly(tmp_path, caplog):
    whole = _model()
    _trainer(whole, tmp_path / "whole").train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    # a dense from_pretrained of a Trainer checkpoint refuses, naming moefy's loader
    for dense in (transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM):
        with pytest.raises(ValueError, match=r"moefy checkpoint, not a dense one: load it with moefy\.hf\.load"):
            dense.from_pretrained(checkpoint)
    # moefy's own loader reads it: the weights after step 2, not the model's; a clean config
    at_two = moefy.hf.load(checkpoint)
    assert any(not torch.equal(v, whole.state_dict()[k]) for k, v in at_two.state_dict().items())
    assert not hasattr(at_two.config, "transformers_weights")

    resumed = _model()
    with torch.no_grad():  # start from other weights: only the checkpoint can bring them back
        for p in resumed.parameters():
            p.add_(1.0)
    with caplog.at_level(logging.WARNING):
        _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    assert "keys" not in caplog.text  # Trainer's "There were missing / unexpected keys ..."
    # bitwise: same ops on the same inputs in the same order on one CPU, optimizer and RNG states restored
    _assert_same(_weights(resumed), _weights(whole))

    # a folder saved before the Trainer index (no index, no transformers_weights) still loads
    old = tmp_path / "old"
    old.mkdir()
    for name in ("moefy.json", "moefy.safetensors"):
        (old / name).write_bytes((checkpoint / name).read_bytes())
    meta = json.loads((old / "moefy.json").read_text())  # moefy.json of then: format 1, no commit record
    del meta["files"]
    (old / "moefy.json").write_text(json.dumps({**meta, "format_version": 1}))
    config = json.loads((checkpoint / "config.json").read_text())
    del config["transformers_weights"]
    (old / "config.json").write_text(json.dumps(config))
    _assert_same(moefy.hf.load(old).state_dict(), at_two.state_dict())


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path, caplog):
    model = _model()
    evaluations = iter(range(STEPS))
    # a metric that scores the first evaluation (step 2) best, so keeping the last model fails the test
    trainer = _trainer(model, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="order", greater_is_better=False,
                       compute_metrics=lambda prediction: {"order": next(evaluations)})
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert [(e["step"], e["eval_order"]) for e in trainer.state.log_history if "eval_order" in e] == [(2, 0), (4, 1)]
    assert trainer.state.best_model_checkpoint == os.path.join(str(tmp_path), "checkpoint-2")
    best = moefy.hf.load(tmp_path / "checkpoint-2").state_dict()
    last = moefy.hf.load(tmp_path / "checkpoint-4").state_dict()
    _assert_same(_weights(model), best)
    assert any(not torch.equal(v, last[k]) for k, v in best.items())
    assert "Could not locate the best model" not in caplog.text and "keys" not in caplog.text
    # in distributed training Trainer may call save_pretrained on every process: only the main one writes
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()


def _family_routed():
    """A tiny GPT-OSS imported by from_hf with its own routers kept (moefy.hf.generic), its experts trained."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=LENGTH, sliding_window=LENGTH,
                                       layer_types=["full_attention"] * 2)
    return moefy.hf.from_hf(transformers.GptOssForCausalLM(config))


def test_a_family_routed_model_resumes_its_experts_from_a_checkpoint(tmp_path, caplog):
    """save_pretrained writes the family's layout (the experts at their own place); Trainer resumes with
    load_state_dict(strict=False), which used to skip every expert (a warning) and train on from stale experts."""
    whole = _family_routed()
    _trainer(whole, tmp_path / "whole").train()
    resumed = _family_routed()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    with caplog.at_level(logging.WARNING):
        _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert "keys" not in caplog.text
    _assert_same(_weights(resumed), _weights(whole))
    # the family's layout loads strictly, as the blocks' own does
    fresh = _family_routed()
    fresh.load_state_dict(moefy.hf.generic.family_state_dict(whole), strict=True)
    _assert_same(_weights(fresh), _weights(whole))
