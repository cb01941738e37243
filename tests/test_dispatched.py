"""Models placed by accelerate (`device_map`, as `from_pretrained(device_map="auto")` does) and models on CUDA.

A model dispatched across devices carries accelerate's hooks on every module (inputs moved to each
module's device). On this CPU-only machine the same hooks are attached with every module on the CPU
(`force_hooks`): the Pruner must plan, slice, mask and save such a model exactly as the plain one.
Where there is a GPU, the whole path runs on it, nothing moved to the CPU behind the user's back.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

from adaprune import Pruner
from adaprune.errors import ConfigurationError

from families import FAMILIES, Shape, build

SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=48)


def _batches(seed: int = 1, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab, (2, 16), generator=g).to(device) for _ in range(3)]


def _twins(family):
    plain = build(family, SHAPE)
    twin = build(family, SHAPE)
    twin.load_state_dict(plain.state_dict())
    return plain, twin


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llama", "qwen2", "bloom")],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_dispatched_model_prunes_as_the_plain_one(family, mode, tmp_path):
    plain, twin = _twins(family)
    device_map = {name: "cpu" for name, _ in twin.named_children()}
    dispatched = dispatch_model(twin, device_map, force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in dispatched.modules())  # accelerate's hooks are there
    expected_pruner, pruner = Pruner(plain, progress=False, mode=mode), Pruner(dispatched, progress=False, mode=mode)
    expected, plan = expected_pruner.plan(_batches()), pruner.plan(_batches())
    assert plan.layers == expected.layers and plan.scores == expected.scores
    expected_pruner.apply(expected)
    if mode == "slice":
        pruner.save(plan, tmp_path / "pruned")  # slices, then writes
    else:
        pruner.apply(plan)
    ids = _batches(seed=7)[0]
    with torch.no_grad():
        assert torch.equal(dispatched(ids).logits, plain(ids).logits)
        if mode == "slice":
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
            assert torch.equal(reloaded(ids).logits, plain(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_is_pruned_on_cuda(tmp_path):
    family = next(f for f in FAMILIES if f.name == "llama")
    model = build(family, SHAPE).cuda()
    pruner = Pruner(model, progress=False)
    plan = pruner.plan(_batches(device="cuda"))
    pruner.apply(plan)
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(_batches(seed=7, device="cuda")[0]).logits).all()


def test_offloaded_modules_are_refused_with_the_way_out(tmp_path):
    """accelerate's offload (what device_map="auto" does with what a GPU cannot hold) keeps weights
    outside the modules: refused before any work, naming the streamed alternative."""
    family = next(f for f in FAMILIES if f.name == "llama")
    model = build(family, SHAPE)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = dispatch_model(model, device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    with pytest.raises(ConfigurationError, match=r"accelerate offloaded .* model\.layers\.1.*offload=folder"):
        Pruner(offloaded, progress=False)
