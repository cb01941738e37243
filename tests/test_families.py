"""Family-specific checks; the shared properties of every family run in test_properties.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from adaprune import Plan, Pruner, UnsupportedArchitectureError, detect_spec, unit_table
from families import FAMILIES, Shape, build

IDS = torch.tensor([[5, 17, 3, 42, 8, 1, 64, 23, 11]])


def family(name: str):
    return next(f for f in FAMILIES if f.name == name)


def prune(model, **removals: list[list[int]]) -> torch.Tensor:
    """Prune `model` by a plan removing `removals` (a LayerPlan field: one list per layer); see `apply_checked`."""
    plan = Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False).plan()
    for field, per_layer in removals.items():
        for layer, indices in zip(plan.layers, per_layer):
            setattr(layer, field, list(indices))
    return apply_checked(model, plan)


def apply_checked(model, plan: Plan) -> torch.Tensor:
    """Mask `model` by `plan`, then slice it; check both give the same logits and return them.

    The model stays sliced.
    """
    pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False)
    with torch.no_grad():
        pruner.apply(plan, mode="mask")
        masked = model(input_ids=IDS).logits
        pruner.restore()
        pruner.apply(plan, mode="slice")
        sliced = model(input_ids=IDS).logits
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-5)
    return sliced


def reload(model, folder, trust_remote_code: bool = False):
    """Save `model`, and load it back (trusting the remote code when asked to, or when it has some)."""
    model.save_pretrained(folder)
    remote = trust_remote_code or "auto_map" in json.loads((folder / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---- detection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spec", [("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2"),
                                        ("phi3", "phi3"), ("opt", "opt"), ("bloom", "bloom"),
                                        ("baichuan", "baichuan")])
def test_each_family_is_detected_from_the_model(name, spec):
    model = build(family(name), Shape(layers=1, kv_heads=2, heads_per_group=1, head_dim=4, width=8))
    model.config._name_or_path = "someone/else"  # a hub name says nothing: config and modules decide
    assert detect_spec(model).name == spec


def test_class_name_alone_is_not_enough():
    """A model whose class name matches but whose modules do not is refused, not mis-sliced."""
    model = build(family("llama"), Shape(layers=1, kv_heads=1, heads_per_group=1, head_dim=4, width=8))
    model.config.model_type = "unknown"
    assert detect_spec(model).name == "llama"  # found by its class name and module tree
    model.model.layers[0].mlp.add_module("up_proj", None)
    with pytest.raises(UnsupportedArchitectureError):
        detect_spec(model)


@pytest.mark.parametrize("model", [
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)),
    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50)),
], ids=lambda m: type(m).__name__)
def test_family_without_a_spec_names_the_class_and_the_doc(model):
    with pytest.raises(UnsupportedArchitectureError, match=f"{type(model).__name__}.*docs/adding-a-family.md"):
        Pruner(model)


# ---- Llama configurations: Vicuna (MHA), TinyLlama / Llama-3 / SmolLM2 (GQA), MQA ---------------------

@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (9, 3), (4, 1)], ids=["mha", "gqa", "gqa-9-3", "mqa"])
def test_llama_configurations_prune_and_reload(heads, kv_heads, tmp_path):
    config = LlamaConfig(vocab_size=97, hidden_size=heads * 8, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    pruner = Pruner(model, ratio=0.3, estimators=["magnitude"], units=["kv_groups", "channels"], progress=False)
    plan = pruner.plan()
    assert all(len(layer.remove_kv_groups) < kv_heads for layer in plan.layers)
    sliced = apply_checked(model, plan)
    torch.testing.assert_close(logits(reload(model, tmp_path)), sliced, rtol=0, atol=1e-5)


# ---- Bloom: each head keeps its ALiBi slope ------------------------------------------------------------

def bloom_with_heads_removed():
    """A 2-layer Bloom of 4 heads, sliced: layer 0 lost head 1, layer 1 heads 0 and 2. Returns it and its logits."""
    model = build(family("bloom"), Shape(layers=2, kv_heads=4, heads_per_group=1, head_dim=8, width=0))
    return model, prune(model, remove_kv_groups=[[1], [0, 2]])


def slopes_used(model) -> list[torch.Tensor]:
    """Per layer, the ALiBi slope each head's attention computes with (as its forward receives them)."""
    seen = []
    hooks = [layer.self_attention.register_forward_pre_hook(  # after adaprune's own hook, if any
        lambda module, args, kwargs: seen.append(kwargs["alibi"][:, 0, 1]), with_kwargs=True)
        for layer in model.transformer.h]
    try:
        logits(model)  # one sequence, no padding: position 1 of head h's ALiBi row is its slope
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_bloom_heads_keep_their_original_alibi_slopes(tmp_path):
    model, sliced = bloom_with_heads_removed()
    original = _get_alibi_slopes(4, torch.device("cpu"))
    for layer, kept, slopes in zip(model.transformer.h, ([0, 2, 3], [1, 3]), slopes_used(model)):
        assert layer.self_attention.alibi_heads == kept
        torch.testing.assert_close(slopes, original[kept], rtol=0, atol=0)
    # What stock Bloom would give layer 0's three remaining heads: other slopes.
    assert not torch.equal(_get_alibi_slopes(3, torch.device("cpu")), original[[0, 2, 3]])

    reloaded = reload(model, tmp_path, trust_remote_code=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "AutoModelForCausalLM" in config["auto_map"]
    kept_per_layer = [reloaded.config.per_layer_config[i].alibi_heads for i in range(2)]
    assert kept_per_layer == [[0, 2, 3], [1, 3]]
    torch.testing.assert_close(logits(reloaded), sliced, rtol=0, atol=1e-5)


def test_bloom_pruned_twice_maps_heads_back_to_the_original_ones(tmp_path):
    model, _ = bloom_with_heads_removed()
    reloaded = reload(model, tmp_path, trust_remote_code=True)
    prune(reloaded, remove_kv_groups=[[1], []])  # current head 1 of layer 0 is original head 2
    assert reloaded.transformer.h[0].self_attention.alibi_heads == [0, 3]


def test_bloom_channel_pruning_alone_still_needs_the_generated_file(tmp_path):
    """Stock Bloom sizes its MLP as 4 * hidden_size: a narrower one cannot load without the generated file."""
    model = build(family("bloom"), Shape(layers=1, kv_heads=2, heads_per_group=1, head_dim=8, width=0))
    prune(model, remove_channels=[range(0, 64, 2)])
    config = model.config
    assert (config.intermediate_size, config.n_head, config.head_dim) == (32, 2, 8)
    reloaded = reload(model, tmp_path, trust_remote_code=True)
    assert "auto_map" in json.loads((tmp_path / "config.json").read_text())
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


# ---- Phi-3: fused layouts --------------------------------------------------------------------------

def test_phi3_fused_layouts_map_rows_to_their_owners():
    model = build(family("phi3"), Shape(layers=1, kv_heads=2, heads_per_group=2, head_dim=4, width=6))
    layer = unit_table(model).layers[0]
    owners = {(m.param_name.split(".")[-2], level): m.owner.tolist()
              for level in ("kv_group", "head", "channel") for m in layer.members[level]}
    q_groups, kv_groups = [h // 2 for h in range(4) for _ in range(4)], [g for g in range(2) for _ in range(4)]
    assert owners[("qkv_proj", "kv_group")] == q_groups + kv_groups + kv_groups  # [q; k; v]
    assert owners[("qkv_proj", "head")] == [h for h in range(4) for _ in range(4)] + [-1] * 16
    assert owners[("gate_up_proj", "channel")] == list(range(6)) * 2  # [gate; up]


def test_phi3_slicing_keeps_the_right_rows_of_fused_projections():
    model = build(family("phi3"), Shape(layers=1, kv_heads=2, heads_per_group=2, head_dim=4, width=6))
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight.detach().clone()
    prune(model, remove_kv_groups=[[0]], remove_channels=[[1, 4]])
    rows = lambda blocks: torch.cat([torch.arange(b * 4, b * 4 + 4) for b in blocks])  # noqa: E731
    # q heads 2, 3 (group 1), k head 1, v head 1 of the blocks [q0..q3, k0, k1, v0, v1]
    torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.weight, qkv[rows([2, 3, 5, 7])])
    channels = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(model.model.layers[0].mlp.gate_up_proj.weight, gate_up[torch.cat([channels, channels + 6])])
    assert model.model.layers[0].self_attn.config.num_attention_heads == 2


# ---- OPT, Mistral, Qwen2 --------------------------------------------------------------------------

def test_opt_channel_pruning_reloads_with_stock_classes(tmp_path):
    model = build(family("opt"), Shape(layers=2, kv_heads=2, heads_per_group=1, head_dim=8, width=12))
    prune(model, remove_channels=[[0, 5, 7]] * 2)
    assert model.config.ffn_dim == 9 and not getattr(model.config, "auto_map", None)
    reloaded = reload(model, tmp_path)
    assert type(reloaded).__name__ == "OPTForCausalLM"
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


def test_opt_head_pruning_rewrites_attention_attributes(tmp_path):
    model = build(family("opt"), Shape(layers=1, kv_heads=3, heads_per_group=1, head_dim=8, width=12))
    prune(model, remove_kv_groups=[[1]])
    attention = model.model.decoder.layers[0].self_attn
    assert (attention.num_heads, attention.head_dim, attention.q_proj.out_features) == (2, 8, 16)
    reloaded = reload(model, tmp_path, trust_remote_code=True)
    assert reloaded.model.decoder.layers[0].self_attn.num_heads == 2
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


def test_mistral_keeps_its_sliding_window(tmp_path):
    model = build(family("mistral"), Shape(layers=1, kv_heads=2, heads_per_group=2, head_dim=4, width=8))
    prune(model, remove_kv_groups=[[0]])
    reloaded = reload(model, tmp_path)
    assert type(reloaded).__name__ == "MistralForCausalLM" and reloaded.config.sliding_window == 4


def test_qwen2_slices_the_qkv_biases_with_their_rows():
    model = build(family("qwen2"), Shape(layers=1, kv_heads=2, heads_per_group=2, head_dim=4, width=8))
    k_bias = model.model.layers[0].self_attn.k_proj.bias.detach().clone()
    prune(model, remove_kv_groups=[[0]])
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias.shape == (8,) and attention.o_proj.bias is None
    torch.testing.assert_close(attention.k_proj.bias, k_bias[4:])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied


# ---- Baichuan: remote code ----------------------------------------------------------------------

def test_baichuan_channel_pruning_reloads_with_its_own_remote_code(tmp_path):
    model = build(family("baichuan"), Shape(layers=2, kv_heads=2, heads_per_group=1, head_dim=8, width=12))
    prune(model, remove_channels=[[1, 2]] * 2)
    reloaded = reload(model, tmp_path, trust_remote_code=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaiChuanForCausalLM"
    assert config["intermediate_size"] == 10 and "per_layer_config" not in config
    assert type(reloaded).__name__ == "BaiChuanForCausalLM"
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


def test_baichuan_head_pruning_subclasses_the_remote_code(tmp_path):
    model = build(family("baichuan"), Shape(layers=2, kv_heads=4, heads_per_group=1, head_dim=8, width=12))
    remote_class = type(model)
    sliced = prune(model, remove_kv_groups=[[3], [0, 1]])
    assert isinstance(model, remote_class)  # the generated class builds on the very remote class
    reloaded = reload(model, tmp_path, trust_remote_code=True)
    saved = sorted(path.name for path in tmp_path.glob("*.py"))
    assert saved == ["configuration_baichuan.py", "modeling_adapruned_baichuanforcausallm.py", "modeling_baichuan.py"]
    assert "from .modeling_baichuan import BaiChuanForCausalLM" in (
        tmp_path / "modeling_adapruned_baichuanforcausallm.py").read_text()
    assert [layer.self_attn.num_heads for layer in reloaded.model.layers] == [3, 2]
    assert type(reloaded).__mro__[1].__name__ == "BaiChuanForCausalLM"
    torch.testing.assert_close(logits(reloaded), sliced, rtol=0, atol=1e-5)


def test_phi3_longrope_with_heads_pruned_reloads_through_the_generated_file(tmp_path):
    """Phi-3's check of its longrope factors derives head_dim from the head count: the generated file
    runs it at the unpruned count."""
    config = Phi3Config(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        original_max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    prune(model, remove_kv_groups=[[0]] * 2)
    reloaded = reload(model, tmp_path)
    assert type(reloaded).__name__ == "AdaprunedPhi3ForCausalLM"
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)
