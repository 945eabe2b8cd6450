"""LoRA + prefix embeddings (lorakit.prefix): the batch transform, gradients, the file beside the
adapter, generation (batched = alone = a manual greedy loop over full forwards), training with
resume, the serving engine, and `lorakit train --n-prefix`.

References are recomputed here from first principles: a prefixed forward must equal the model run
on ``cat(prefix, embed(ids))``; generation must equal argmax over full forwards of that.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.generate import generate_ids
from lorakit.prefix import (PREFIX_FILE, PrefixEmbedding, PrefixFileError, insert_placeholders, load_prefix,
                            prefix_batch, save_prefix)
from lorakit.train import ResumeError, train

from conftest import randomize_adapters, tiny_llama
from test_cli import e2e_file, model_dir  # noqa: F401 - module fixtures: a tiny model dir and an E2E file
from test_train import Crash, adapter_tensors, batches, config, crash_at, injected, token_examples

LORA = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def random_prefix(model, n: int = 3, seed: int = 0) -> PrefixEmbedding:
    """A prefix far from its initial rows, so that a misplaced row shows in the outputs."""
    prefix = PrefixEmbedding.from_vocabulary(model, n, seed=seed)
    with torch.no_grad():
        prefix.weight.add_(torch.randn(prefix.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return prefix


def adapted(seed: int = 0):
    model = lorakit.inject(tiny_llama(), LORA)
    randomize_adapters(model, seed=seed + 1, std=0.2)
    return model.eval()


# --- the batch transform ----------------------------------------------------------------------

@pytest.mark.parametrize("ids, mask, labels, want_ids, want_mask, want_labels, want_starts", [
    # right padded (training): the prefix takes columns 0..1
    ([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]], [[-100, 6, 7], [-100, 9, -100]],
     [[0, 0, 5, 6, 7], [0, 0, 8, 9, 0]], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
     [[-100, -100, -100, 6, 7], [-100, -100, -100, 9, -100]], [0, 0]),
    # left padded (generation): the prefix comes after the padding, right before the first real token
    ([[5, 6, 7], [0, 8, 9]], [[1, 1, 1], [0, 1, 1]], None,
     [[0, 0, 5, 6, 7], [0, 0, 0, 8, 9]], [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], None, [0, 1]),
    # no mask: every column is real
    ([[5, 6]], None, None, [[0, 0, 5, 6]], [[1, 1, 1, 1]], None, [0]),
])
def test_insert_placeholders(ids, mask, labels, want_ids, want_mask, want_labels, want_starts):
    t = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    new_ids, new_mask, new_labels, starts = insert_placeholders(t(ids), t(mask), 2, placeholder_id=0, labels=t(labels))
    assert new_ids.tolist() == want_ids
    assert new_mask.tolist() == want_mask
    assert (new_labels.tolist() if new_labels is not None else None) == want_labels
    assert starts.tolist() == want_starts


def test_prefixed_forward_equals_the_model_on_prefix_then_tokens():
    model = adapted()
    prefix = random_prefix(model)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = prefix_batch(model, prefix, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert batch["labels"][:, :3].eq(-100).all() and torch.equal(batch["labels"][:, 3:], ids)
    assert batch["attention_mask"].shape == (2, 9) and batch["attention_mask"].eq(1).all()
    reference = torch.cat([prefix.weight.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        got = model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
        want = model(inputs_embeds=reference).logits
    torch.testing.assert_close(got, want)


def test_prefix_batch_refuses_class_labels():
    model = tiny_llama()
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="n_prefix"):
        prefix_batch(model, PrefixEmbedding(2, 32), {"input_ids": ids, "labels": torch.tensor([0, 1])})


def test_gradient_reaches_the_prefix_and_the_lora_factors():
    model = lorakit.inject(tiny_llama(), LORA)  # B = 0: A's gradient is 0 at step 0, B's is not
    prefix = PrefixEmbedding.from_vocabulary(model, 4, seed=0)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    batch = prefix_batch(model, prefix, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    model(**batch).loss.backward()
    assert prefix.weight.grad is not None and prefix.weight.grad.abs().sum(dim=1).gt(0).all()  # every row
    bs = [p for m in model.modules() if isinstance(m, lorakit.LoraLayer) for p in m.lora_B.values()]
    assert bs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in bs)
    assert not any(p.grad is not None for n, p in model.named_parameters() if not p.requires_grad)


def test_initialised_from_seeded_vocabulary_rows():
    model = tiny_llama()
    a, b = PrefixEmbedding.from_vocabulary(model, 5, seed=3), PrefixEmbedding.from_vocabulary(model, 5, seed=3)
    assert torch.equal(a.weight, b.weight) and a.weight.dtype == torch.float32 and a.weight.requires_grad
    table = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, t) for t in table) for row in a.weight)  # each row is some token's row
    assert len({tuple(r.tolist()) for r in a.weight}) == 5


# --- the file ---------------------------------------------------------------------------------

def test_save_load_round_trip_beside_a_peft_loadable_adapter(tmp_path):
    from peft import PeftModel

    model = adapted()
    prefix = random_prefix(model, 3)
    lorakit.save_adapter(model, tmp_path)
    save_prefix(prefix, tmp_path, base_model="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          PREFIX_FILE]
    back = load_prefix(tmp_path, hidden_size=32)
    assert torch.equal(back.weight, prefix.weight) and back.n_prefix == 3
    assert load_prefix(tmp_path / "nowhere") is None
    PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the extra file does not disturb PEFT
    lorakit.load_adapter(tiny_llama(), tmp_path)       # nor lorakit


def test_load_refuses_bad_files(tmp_path):
    save_prefix(PrefixEmbedding(2, 32), tmp_path)
    with pytest.raises(PrefixFileError, match="hidden size 32.*have 48"):
        load_prefix(tmp_path, hidden_size=48)
    path = tmp_path / PREFIX_FILE
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(PrefixFileError, match="damaged"):
        load_prefix(tmp_path)
    save_file({"other": torch.zeros(2, 32)}, str(path))
    with pytest.raises(PrefixFileError, match="holds tensors"):
        load_prefix(tmp_path)
    save_file({"prefix_embeddings": torch.zeros(2, 32)}, str(path), metadata={"format": "something else"})
    with pytest.raises(PrefixFileError, match="not a lorakit prefix file"):
        load_prefix(tmp_path)


# --- generation -------------------------------------------------------------------------------

def manual_greedy(model, prefix, prompt, new):
    """Argmax over full forwards (no cache) of cat(prefix, embed(tokens))."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            embeds = torch.cat([prefix.weight[None], model.get_input_embeddings()(torch.tensor([tokens]))], dim=1)
            tokens.append(int(model(inputs_embeds=embeds).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_generation_with_a_prefix_equals_each_prompt_alone_and_a_manual_loop():
    model = adapted()
    prefix = random_prefix(model, 3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0, progress=False, prefix=prefix)
    together = generate_ids(model, prompts, batch_size=3, **kw)
    alone = [generate_ids(model, [p], **kw)[0] for p in prompts]
    assert together == alone
    assert together == [manual_greedy(model, prefix, p, 6) for p in prompts]
    plain = generate_ids(model, prompts, max_new_tokens=6, eos_token_id=None, pad_token_id=0, progress=False)
    assert plain != together  # the prefix is used


def test_generation_counts_the_prefix_against_the_positions():
    model = adapted()  # 64 positions
    with pytest.raises(ValueError, match="with the 8 prefix embeddings"):
        generate_ids(model, [[1] * 50], max_new_tokens=10, eos_token_id=None, pad_token_id=0,
                     prefix=PrefixEmbedding(8, 32))


# --- training and resume ----------------------------------------------------------------------

def test_training_moves_and_saves_the_prefix_and_counts_it(tmp_path):
    model = injected()
    prefix = PrefixEmbedding.from_vocabulary(model, 4, seed=0)
    start = prefix.weight.detach().clone()
    data = token_examples()
    result = train(model, batches(data, 8), config(tmp_path, max_steps=4), eval_batches=batches(data[:16], 8),
                   prefix=prefix)
    assert not torch.equal(prefix.weight.detach(), start)
    assert result.trainable_parameters == lorakit.trainable_parameters(model)[0] + 4 * 32
    assert json.loads((tmp_path / "run.json").read_text())["n_prefix"] == 4
    for folder in ("adapter", "best"):
        assert torch.equal(load_prefix(tmp_path / folder).weight, prefix.weight.detach()), folder
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "checkpoint" / "adapter.safetensors"))["prefix_embeddings"],
                       prefix.weight.detach())


def test_resume_gives_the_uninterrupted_prefix_and_adapter(tmp_path):
    data = token_examples()

    def run(out, **kw):
        model = injected()
        prefix = PrefixEmbedding.from_vocabulary(model, 3, seed=0)
        train(model, batches(data, 8), config(out, max_steps=8), eval_batches=batches(data[:16], 8),
              prefix=prefix, **kw)

    run(tmp_path / "whole")
    with pytest.raises(Crash):
        run(tmp_path / "cut", on_step=crash_at(6))  # last checkpoint: step 4
    run(tmp_path / "cut", resume=True)
    whole, cut = tmp_path / "whole" / "adapter", tmp_path / "cut" / "adapter"
    assert torch.equal(load_prefix(whole).weight, load_prefix(cut).weight)
    expected, got = adapter_tensors(whole), adapter_tensors(cut)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ResumeError, match="n_prefix"):  # the checkpoint's run had a prefix, this one has none
        train(injected(), batches(data, 8), config(tmp_path / "cut", max_steps=8), resume=True)


def test_prefix_trains_beside_loraplus_groups(tmp_path):
    model = injected()
    prefix = PrefixEmbedding.from_vocabulary(model, 2, seed=0)
    start = prefix.weight.detach().clone()
    train(model, batches(token_examples(16), 8), config(tmp_path, max_steps=2, loraplus_ratio=4.0), prefix=prefix)
    assert not torch.equal(prefix.weight.detach(), start)


def test_prefix_is_refused_under_several_processes():
    from lorakit.train import distributed
    from lorakit.train.trainer import _check_prefix

    with pytest.raises(ValueError, match="n_prefix.*one process"):
        _check_prefix(PrefixEmbedding(2, 32), "default", distributed.Dist(rank=0, world_size=2))


def test_a_run_without_prefix_removes_a_stale_prefix_file(tmp_path):
    save_prefix(PrefixEmbedding(2, 32), tmp_path / "adapter")
    data = token_examples(16)
    train(injected(), batches(data, 8), config(tmp_path, max_steps=1))
    assert not (tmp_path / "adapter" / PREFIX_FILE).exists()


# --- the serving engine -----------------------------------------------------------------------

def test_engine_uses_each_adapters_prefix_in_a_mixed_batch(tmp_path):
    from lorakit.serving import Engine

    with_prefix, plain = adapted(seed=0), adapted(seed=5)
    prefix = random_prefix(with_prefix, 3)
    lorakit.save_adapter(with_prefix, tmp_path / "pre")
    save_prefix(prefix, tmp_path / "pre")
    lorakit.save_adapter(plain, tmp_path / "plain")
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]
    kw = dict(max_new_tokens=5, eos_token_id=None, pad_token_id=0, progress=False)
    want = [generate_ids(with_prefix, [prompts[0]], prefix=prefix, **kw)[0],
            generate_ids(plain, [prompts[1]], **kw)[0],
            generate_ids(tiny_llama(), [prompts[2]], **kw)[0],
            generate_ids(with_prefix, [prompts[3]], prefix=prefix, **kw)[0]]
    assert want[0] != generate_ids(with_prefix, [prompts[0]], **kw)[0]  # the prefix changes this output
    engine = Engine(tiny_llama(), None, max_batch=4, max_rank=8)
    engine.add_adapter("pre", tmp_path / "pre")
    engine.add_adapter("plain", tmp_path / "plain")
    got = engine.generate(prompts, adapters=["pre", "plain", None, "pre"], max_new_tokens=5, ignore_eos=True)
    assert got == want
    engine.remove_adapter("pre")
    assert "pre" not in engine.prefixes


def test_engine_refuses_a_prefix_of_another_width(tmp_path):
    from lorakit.serving import Engine

    lorakit.save_adapter(adapted(), tmp_path)
    save_prefix(PrefixEmbedding(2, 48), tmp_path)
    engine = Engine(tiny_llama(), None, max_batch=2, max_rank=8)
    with pytest.raises(PrefixFileError, match="hidden size 48"):
        engine.add_adapter("x", tmp_path)
    assert engine.adapters == []


# --- the command line -------------------------------------------------------------------------

def test_cli_train_with_n_prefix_then_generate(model_dir, e2e_file, tmp_path, capsys):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(e2e_file), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--lr", "1e-2", "--rank", "2", "--n-prefix", "3", "--device", "cpu"]) == 0
    assert "in 3 prefix embeddings" in capsys.readouterr().out
    assert load_prefix(out / "adapter").n_prefix == 3
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    assert main(["generate", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--prompt", "name[x]",
                 "--max-new-tokens", "3"]) == 0
    assert "using its 3 prefix embeddings" in capsys.readouterr().err
    assert main(["train", "--task", "classification", "--model", str(model_dir), "--data", str(e2e_file),
                 "--out", str(tmp_path / "c"), "--n-prefix", "2"]) != 0
    assert "--n-prefix 2" in capsys.readouterr().err
