"""
support/lora.py: LoRA on the Transformer, the [PAD] row and what adaptation adds trained whole, the
adapter saved in PEFT's layout, loaded by Transformer.from_pretrained, merged into a plain checkpoint.

PEFT is the oracle, as transformers is for the model: it loads our adapter onto the transformers model
and computes our logits, and an adapter PEFT saves loads into ours and computes its logits.
"""
import json
import math
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from torch.testing import assert_close

from model import Transformer, preset
from support import fused_loss, lora
from support.run_folder import grow_vocab

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PAD = 100  # the last id of SMALL's vocabulary plays [PAD]


def base_checkpoint(path, arch="LlamaForCausalLM", **cfg) -> str:
    """A tiny random transformers checkpoint (every weight random, norms too) saved at path."""
    config = transformers.AutoConfig.for_model(getattr(transformers, arch).config_class.model_type, **{**SMALL, **cfg})
    torch.manual_seed(0)
    m = getattr(transformers, arch)(config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    m.save_pretrained(path)
    return str(path)


def perturb(net, seed=1):
    """Trained-looking adapters: B, the rows and what trains whole random (B starts at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return net


def adapted(path, r=4, alpha=8.0, targets=lora.TARGETS, **overrides):
    """Our model of the checkpoint at path with LoRA, the [PAD] row trained, adapters perturbed."""
    net = Transformer.from_pretrained(path, verbose=False, **overrides)
    return perturb(lora.apply_lora(net, path, r, alpha, targets=targets, token_rows=lora.pad_rows(net, PAD))).eval()


def ids_for(B=2, T=10, seed=2):
    ids = torch.randint(0, PAD, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[0, -3:] = PAD  # the trained row is read
    return ids


# -----------------------------------------------------------------------------
# the layer and what trains


def test_lora_layer_is_w_x_plus_alpha_over_r_b_a_x_and_starts_as_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = lora.LoRALinear(base, r=3, alpha=6.0, dropout=0.0)
    lora.init_adapters(layer, seed=0)
    x = torch.randn(2, 4, 6)
    assert torch.equal(layer(x), base(x))  # B = 0: at first the base
    bound = 1 / math.sqrt(6)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as PEFT draws A
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > bound / 2
    torch.nn.init.normal_(layer.lora_B.weight)
    W, b, A, B = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    assert_close(layer(x), x @ W.T + b + (6.0 / 3) * (x @ A.T) @ B.T)
    # dropout acts on the adapter's input only, in training
    drop = lora.LoRALinear(base, r=3, alpha=6.0, dropout=0.5)
    drop.lora_A.weight.data, drop.lora_B.weight.data = A.data, B.data
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    assert_close(y, x @ W.T + b + 2.0 * (torch.nn.functional.dropout(x, 0.5) @ A.T) @ B.T)
    assert_close(drop.eval()(x), layer(x))


def test_gradients_reach_only_the_adapters_the_pad_rows_and_the_timestep_embedding():
    torch.manual_seed(0)
    net = Transformer(preset("tiny", **SMALL, timestep_embed=True, causal=False)).init_weights()
    lora.apply_lora(net, "base", r=2, alpha=4.0, targets=("q_proj", "down_proj"), token_rows=lora.pad_rows(net, PAD))
    perturb(net)  # B != 0, so that A gets a gradient too
    ids, span = ids_for(), torch.zeros(2, 10, dtype=torch.bool)
    span[:, 4:7] = True  # the [PAD] rows (7..9 of row 0) are context: their embedding is read
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = fused_loss.diffusion_loss(net, ids, span, torch.tensor([10, 900]), [1, 2], False, torch.ones(2))
    loss.backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {f"model.layers.{i}.{m}.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
                       for m in ("self_attn.q_proj", "mlp.down_proj")} | \
        {"model.embed_tokens.rows", "lm_head.rows", "timestep_embed.weight"}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == trained  # all else frozen
    torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1).step()
    for name in ("model.embed_tokens", "lm_head"):  # the whole matrix: only its [PAD] row moved
        weight = net.get_submodule(name).weight
        assert torch.equal(weight[:PAD], before[f"{name}.base_layer.weight"][:PAD])
        assert not torch.equal(weight[PAD], before[f"{name}.base_layer.weight"][PAD])
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if not p.requires_grad)


def test_tied_embeddings_train_one_pad_row_read_by_both_ends():
    torch.manual_seed(0)
    net = Transformer(preset("tiny", **SMALL, tie_word_embeddings=True)).init_weights()
    lora.apply_lora(net, "base", r=2, alpha=2.0, targets=("v_proj",), token_rows=lora.pad_rows(net, PAD))
    assert lora.pad_rows(net, PAD) == {"embed_tokens": [PAD]}
    assert net.lm_head.rows is net.model.embed_tokens.rows
    net(ids_for()).logsumexp(-1).sum().backward()
    assert net.model.embed_tokens.rows.grad.abs().sum() > 0
    assert [n for n, p in net.named_parameters() if "rows" in n] == ["model.embed_tokens.rows"]  # one parameter


# -----------------------------------------------------------------------------
# merged, saved, loaded


@pytest.mark.parametrize("kind", ["diffusion", "tied", "score"])
def test_merged_and_unmerged_models_compute_the_same(tmp_path, kind):
    overrides = dict(diffusion=dict(timestep_embed=True, causal=False), tied={}, score=dict(head="score"))[kind]
    path = base_checkpoint(tmp_path / "base", tie_word_embeddings=kind == "tied")
    net = adapted(path, **overrides)
    ids, t = ids_for(), torch.tensor([0.3, 0.8]) if kind == "diffusion" else None
    with torch.no_grad():
        out = net(ids, t=t)
        merged = lora.merge(net)
        assert not any(isinstance(m, (lora.LoRALinear, lora.TokenRows)) for m in merged.modules())
        assert all(p.requires_grad for p in merged.parameters())
        assert_close(merged(ids, t=t), out, **TOL)
    if kind == "tied":
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_adapter_is_saved_in_peft_layout_and_from_pretrained_loads_it(tmp_path):
    path = base_checkpoint(tmp_path / "base", num_hidden_layers=1)
    net = adapted(path, r=2, alpha=3.0, targets=("q_proj", "down_proj"), timestep_embed=True, causal=False)
    net.save_pretrained(tmp_path / "adapter")
    files = ["adapter_config.json", "adapter_model.safetensors", "config.json"]
    assert sorted(os.listdir(tmp_path / "adapter")) == files
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert {k: cfg[k] for k in ("base_model_name_or_path", "peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                "target_modules", "trainable_token_indices", "modules_to_save")} == dict(
        base_model_name_or_path=path, peft_type="LORA", task_type="CAUSAL_LM", r=2, lora_alpha=3.0, lora_dropout=0.0,
        target_modules=["q_proj", "down_proj"], trainable_token_indices={"embed_tokens": [PAD], "lm_head": [PAD]},
        modules_to_save=["timestep_embed"])
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, 2),
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": (2, 96),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": (64, 2),
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (1, 64),
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta": (1, 64),
        "base_model.model.timestep_embed.weight": (64, 1)}
    back = Transformer.from_pretrained(str(tmp_path / "adapter"), verbose=False).eval()
    assert back.args == net.args and back.adapter == net.adapter
    ids, t = ids_for(), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(back(ids, t=t), net(ids, t=t))


def test_a_pad_row_the_base_lacks_comes_from_the_adapter(tmp_path):
    """Mistral has 32000 ids and TESS 2 adds [PAD]: the adapter of a grown model names the base without
    the row, and loading grows it and fills it from the adapter."""
    path = base_checkpoint(tmp_path / "base", vocab_size=PAD)  # ids 0..99: no [PAD]
    net = Transformer.from_pretrained(path, verbose=False, timestep_embed=True, causal=False)
    grow_vocab(net, PAD + 1)
    perturb(lora.apply_lora(net, path, 2, 2.0, token_rows=lora.pad_rows(net, PAD))).eval()
    net.save_pretrained(tmp_path / "adapter")
    back = Transformer.from_pretrained(str(tmp_path / "adapter"), verbose=False).eval()
    ids, t = ids_for(), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(back(ids, t=t), net(ids, t=t))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    cfg["trainable_token_indices"] = {"embed_tokens": [3], "lm_head": [PAD]}
    json.dump(cfg, open(tmp_path / "adapter" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=r"does not train embed_tokens rows \[100\]"):
        Transformer.from_pretrained(str(tmp_path / "adapter"))


# -----------------------------------------------------------------------------
# PEFT, the oracle


@pytest.mark.parametrize("arch, cfg, head", [
    ("LlamaForCausalLM", {}, "lm"),  # untied: the [PAD] row of the embedding and of the LM head
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), "lm"),  # q/k/v biases, one tied row
    ("MistralForCausalLM", dict(sliding_window=None), "score"),  # a reward model's score head trains whole
])
def test_peft_loads_our_adapter_onto_the_transformers_model_and_computes_our_logits(tmp_path, arch, cfg, head):
    path = base_checkpoint(tmp_path / "base", arch, **cfg)
    net = adapted(path, head=head)
    net.save_pretrained(tmp_path / "adapter")
    auto = transformers.AutoModelForSequenceClassification if head == "score" else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(path, **(dict(num_labels=1, pad_token_id=PAD) if head == "score" else {}))
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = ids_for()
    ids[0, -3:] = 7  # the score head reads the last token; transformers would look for the last non-[PAD]
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
        assert_close(net(ids), ref[:, 0] if head == "score" else ref, **TOL)


def test_an_adapter_peft_saves_loads_into_ours_and_merges_into_a_checkpoint_transformers_reads(tmp_path):
    path = base_checkpoint(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                             trainable_token_indices={"embed_tokens": [PAD, 5], "lm_head": [PAD]})
    theirs = peft.get_peft_model(hf, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "adapter")  # no config.json: the base's architecture
    theirs.eval()
    ours = Transformer.from_pretrained(str(tmp_path / "adapter"), verbose=False).eval()
    assert ours.adapter["lora_dropout"] == 0.1 and ours.model.embed_tokens.index == [PAD, 5]
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, **TOL)
    lora.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(plain(ids).logits, theirs(input_ids=ids).logits, **TOL)


# -----------------------------------------------------------------------------
# the merge command and its errors


def test_merge_keeps_the_tokenizer_and_sampling_defaults_and_refuses_a_plain_checkpoint(tmp_path, capsys):
    from conftest import word_tokenizer
    from support.cli import run_cli
    path = base_checkpoint(tmp_path / "base")
    word_tokenizer(path, ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)] + ["[PAD]"])
    net = adapted(path, timestep_embed=True, causal=False)
    net.save_pretrained(tmp_path / "adapter", tokenizer_from=path, extra_files={"generation_config.json": {"steps": 7}})
    lora.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    files = set(os.listdir(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert "adapter_config.json" not in files
    merged = Transformer.from_pretrained(str(tmp_path / "merged"), verbose=False).eval()
    assert merged.generation_config == {"steps": 7} and merged.args == net.args
    ids, t = ids_for(), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert_close(merged(ids, t=t), net(ids, t=t), **TOL)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lora.main, "python -m support.lora", ["merge", str(tmp_path / "merged"), str(tmp_path / "again")])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "again")
    assert capsys.readouterr().err.strip() == (f"python -m support.lora: error: {tmp_path / 'merged'} has no "
                                               "adapter_config.json: not a LoRA adapter folder")


@pytest.mark.parametrize("edit, message", [
    (lambda cfg: cfg.update(use_dora=True), r"sets \{'use_dora': True\}, which this LoRA does not implement"),
    (lambda cfg: cfg.update(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    (lambda cfg: cfg.update(target_modules=["q_proj"]), r"does not match adapter_config.json: missing \[\], unexp"),
])
def test_an_adapter_that_does_not_fit_is_refused_naming_why(tmp_path, edit, message):
    path = base_checkpoint(tmp_path / "base")
    adapted(path).save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.load(open(file))
    edit(cfg)
    json.dump(cfg, open(file, "w"))
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(str(tmp_path / "adapter"))


# -----------------------------------------------------------------------------
# train.py --lora


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny training datasets and two bases without [PAD] (as Mistral: the run grows the row): an AR
    model, which adapt and rm start from, and a diffusion model (bidirectional, a timestep embedding),
    which sft starts from."""
    from train_runs import make_datasets
    root = tmp_path_factory.mktemp("lora_runs")
    data = make_datasets(str(root))
    for seed, name, kind in ((0, "base", {}), (1, "diffusion", dict(timestep_embed=True, causal=False))):
        torch.manual_seed(seed)
        Transformer(preset("tiny", vocab_size=60, **kind)).init_weights().save_pretrained(str(root / name),
                                                                                        tokenizer_from=data["tok"])
    return data, str(root / "base"), str(root / "diffusion")


def base_of(runs, stage):
    """The base a stage's LoRA run adapts: sft the diffusion model, the others the AR model."""
    return runs[2] if stage == "sft" else runs[1]


def lora_run(runs, stage, out, **kw):
    from train_runs import run
    return run(stage, runs[0], out, **{"init": base_of(runs, stage), "preset": None, "lora": 4, **kw})


@pytest.mark.parametrize("stage, trained_whole, task", [
    ("adapt", {"lm_head.rows", "model.embed_tokens.rows", "timestep_embed.weight"}, "CAUSAL_LM"),
    ("sft", {"lm_head.rows", "model.embed_tokens.rows", "timestep_embed.weight"}, "CAUSAL_LM"),
    ("rm", {"model.embed_tokens.rows", "score.weight"}, "SEQ_CLS"),
])
def test_each_stage_trains_adapters_on_a_frozen_base_and_saves_them_in_peft_layout(runs, tmp_path, stage,
                                                                                   trained_whole, task):
    from train_runs import losses
    log = lora_run(runs, stage, tmp_path, max_steps=6, overfit=True, lr=1e-2)
    assert losses(log)[-1] < losses(log)[0]
    ckpt = str(tmp_path / "step-0000006")
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json", "train_state.pt",
            "train_state.json"} <= set(os.listdir(ckpt)) and "model.safetensors" not in os.listdir(ckpt)
    cfg = json.load(open(os.path.join(ckpt, "adapter_config.json")))
    assert (cfg["base_model_name_or_path"], cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == \
        (base_of(runs, stage), 4, 8.0, task)
    net = Transformer.from_pretrained(ckpt, verbose=False)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained - trained_whole == {n for n in trained if ".lora_" in n} and trained_whole <= trained
    base = Transformer.from_pretrained(base_of(runs, stage), verbose=False)
    frozen = {n.replace(".base_layer", ""): p for n, p in net.named_parameters() if not p.requires_grad}
    for name, p in base.named_parameters():  # the base is untouched ([PAD]'s row aside, 60 of 61 rows)
        if (stage == "rm" and name == "lm_head.weight") or name in trained_whole:  # no LM head; trains whole
            continue
        assert torch.equal(frozen[name][:len(p)], p), name


def test_a_stopped_lora_run_resumes_exactly_dropout_included(runs, tmp_path):
    from train_runs import losses
    whole = lora_run(runs, "sft", tmp_path / "whole", max_steps=6, lora_dropout=0.1)
    first = lora_run(runs, "sft", tmp_path / "cut", max_steps=6, stop_at=3, lora_dropout=0.1)
    assert len(first["train"]) == 3
    with pytest.raises(ValueError, match="trained with --lora 4, this run asks for 8: pass --lora 4"):
        lora_run(runs, "sft", tmp_path / "cut", max_steps=6, lora_dropout=0.1, resume=True, lora=8)
    cut = str(tmp_path / "cut" / "step-0000003")
    with pytest.raises(ValueError, match=r"holds LoRA adapters .*'r': 4.* not .*'r': 8.*merge it"):
        lora_run(runs, "sft", tmp_path / "next", init=cut, lora=8)
    lora_run(runs, "sft", tmp_path / "next", init=cut, lora_dropout=0.1, max_steps=1)  # its adapters train on
    assert lora.is_adapter(str(tmp_path / "next" / "step-0000001"))
    lora_run(runs, "sft", tmp_path / "full", init=cut, lora=None, max_steps=1)  # merged: all weights train
    assert os.path.exists(tmp_path / "full" / "step-0000001" / "model.safetensors")
    resumed = lora_run(runs, "sft", tmp_path / "cut", max_steps=6, lora_dropout=0.1, resume=True)
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4, 5, 6]
    assert_close(losses(resumed), losses(whole), atol=0, rtol=0)
    from safetensors.torch import load_file
    cut, ref = (load_file(str(tmp_path / r / "step-0000006" / "adapter_model.safetensors")) for r in ("cut", "whole"))
    assert cut.keys() == ref.keys() and all(torch.equal(cut[k], ref[k]) for k in ref)


def test_sample_reads_a_lora_checkpoint_as_its_merged_model(runs, tmp_path, capsys):
    import sample
    lora_run(runs, "sft", tmp_path / "run", max_steps=2)
    ckpt = str(tmp_path / "run" / "step-0000002")
    lora.main(["merge", ckpt, str(tmp_path / "merged")])
    texts = []
    for model in (ckpt, str(tmp_path / "merged")):
        capsys.readouterr()
        sample.main(["--model", model, "--prompt", "w1 w2 w3", "--steps", "4", "--length", "6", "--json"])
        texts.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "seconds"})
    assert texts[0] == texts[1] and texts[0]["text"]


def test_lora_flags_that_cannot_work_are_refused_before_anything_is_written(runs, tmp_path):
    from train_runs import run
    data, base = runs[0], base_of(runs, "sft")
    with pytest.raises(ValueError, match="--lora adapts a pretrained model"):
        run("sft", data, tmp_path / "a", lora=4)
    with pytest.raises(ValueError, match="pass --lora R as well"):
        run("sft", data, tmp_path / "b", init=base, preset=None, lora_alpha=16)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_same_adapters_as_one(runs, tmp_path, parallel):
    """2 gloo ranks, DDP or FSDP2 (stopped after step 2 and resumed from the adapter checkpoint: the
    frozen base read shard by shard from the base, the adapters and their AdamW state from the run),
    give the one-process run's losses and adapters."""
    from safetensors.torch import load_file
    from train_runs import WEIGHTS, losses, torchrun
    data, base = runs[0], base_of(runs, "adapt")
    ref = lora_run(runs, "adapt", tmp_path / "one", micro_batch_size=4)
    kw = dict(init=base, preset=None, lora=4, micro_batch_size=2 if parallel == "fsdp" else 1)
    if parallel == "fsdp":
        torchrun("adapt", data, tmp_path / "two", fsdp=True, grad_ckpt=True, stop_at=2, **kw)
        log = torchrun("adapt", data, tmp_path / "two", fsdp=True, grad_ckpt=True, resume=True, **kw)
    else:
        log = torchrun("adapt", data, tmp_path / "two", **kw)
    assert_close(losses(log), losses(ref), atol=1e-5, rtol=1e-5)
    two, one = (load_file(str(tmp_path / run / "step-0000004" / "adapter_model.safetensors")) for run in ("two", "one"))
    assert two.keys() == one.keys()
    for k in one:
        assert_close(two[k], one[k], **WEIGHTS, msg=k)
