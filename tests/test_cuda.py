"""The pipeline on a CUDA device: the same decisions as on the CPU, and nothing moved off the device.

Skipped where there is no GPU (CI has none); run on one with `pytest tests/test_cuda.py`
(benchmarks/gpu_check.sh does, with the scale benchmark). `ADAPRUNE_TEST_DEVICE=cpu` runs the same
tests with the CPU standing in for the GPU, to check the tests themselves without one. The models are float64 where a result is
compared with the CPU's, so that the two devices' rounding cannot flip a ranking; float32 and
bfloat16 where the test is that the pipeline runs in the dtype users load.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

import adaprune
from adaprune import Pruner

from families import FAMILIES, Shape, build

DEVICE = torch.device(os.environ.get("ADAPRUNE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=48)


@pytest.fixture(autouse=True)
def exact_matmul():
    """No TF32: float32 products on the GPU as exact as the CPU's."""
    if DEVICE.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _batches(seed: int = 1, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab, (2, 16), generator=g) for _ in range(count)]


def _pair(family, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random model twice: on the CPU and on the GPU."""
    cpu = build(family, SHAPE).to(dtype).eval()
    gpu = build(family, SHAPE).to(dtype).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(DEVICE)


def _assert_on_device(model: torch.nn.Module) -> None:
    off = [name for name, p in model.named_parameters() if p.device.type != DEVICE.type]
    assert not off, f"moved off the GPU: {off[:3]}"


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(ids.to(device)).logits.double().cpu()


# Baichuan's remote code builds its causal mask in float32 whatever the model's dtype: no float64 run.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name != "baichuan"], ids=lambda f: f.name)
def test_cuda_scores_and_plan_equal_the_cpu_ones(family):
    """Calibration, every estimator kind and the allocation on the GPU decide what they decide on the CPU."""
    cpu, gpu = _pair(family, torch.float64)
    options = dict(estimators=["taylor", "activation", "magnitude"], fusion="fixed", progress=False)
    expected, plan = Pruner(cpu, **options).plan(_batches()), Pruner(gpu, **options).plan(_batches())
    assert plan.layers == expected.layers
    for level, per_layer in expected.scores.items():
        for want, got in zip(per_layer, plan.scores[level]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _assert_on_device(gpu)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_cuda_defaults_mask_slice_and_reload(family, tmp_path):
    """The defaults (adaptive fusion, global allocation, reconstruction) on the GPU, masked and sliced:
    the two appliers agree, the weights stay on the GPU, the checkpoint reloads on the CPU."""
    _, sliced = _pair(family, torch.float32)
    _, masked = _pair(family, torch.float32)
    pruner = Pruner(sliced, progress=False)
    plan = pruner.plan(_batches())
    Pruner(masked, progress=False, mode="mask").apply(plan, calibration=_batches())
    pruner.save(plan, tmp_path / "pruned")
    _assert_on_device(sliced)
    _assert_on_device(masked)
    ids = _batches(seed=7)[0]
    logits = _logits(sliced, ids)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(_logits(masked, ids), logits, rtol=1e-4, atol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(reloaded, ids), logits, rtol=1e-4, atol=1e-4)


def test_cuda_bfloat16_keeps_its_dtype():
    """A bfloat16 model (how 7B models are loaded) is scored, fused, sliced and refitted in bfloat16."""
    model = build(FAMILIES[0], SHAPE).to(torch.bfloat16).to(DEVICE).eval()
    pruner = Pruner(model, ratio=0.3, progress=False)
    plan = pruner.plan(_batches())
    pruner.apply(plan)
    _assert_on_device(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build(FAMILIES[0], SHAPE).parameters())
    assert torch.isfinite(_logits(model, _batches(seed=7)[0])).all()


def test_model_split_between_cuda_and_cpu_prunes_as_the_whole():
    """A model accelerate placed partly on the GPU and partly on the CPU (as `device_map="auto"` does
    when the GPU is too small) plans as the same model on the CPU, and is sliced where it lies."""
    family = FAMILIES[0]
    plain = build(family, SHAPE).double().eval()
    split = build(family, SHAPE).double().eval()
    split.load_state_dict(plain.state_dict())
    device_map = {"model.embed_tokens": DEVICE, "model.rotary_emb": DEVICE, "model.layers.0": DEVICE,
                  "model.layers.1": DEVICE,
                  "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    # main_device="cpu": the CPU part is computed on the CPU, not offloaded to it (accelerate's offload
    # keeps weights outside the modules; adaprune refuses that, tests/test_dispatched.py).
    split = dispatch_model(split, device_map, main_device="cpu", force_hooks=True)
    options = dict(estimators=["taylor", "activation"], fusion="fixed", progress=False)
    expected, plan = Pruner(plain, **options).plan(_batches()), Pruner(split, **options).plan(_batches())
    assert plan.layers == expected.layers
    Pruner(plain, **options).apply(expected, calibration=_batches())
    Pruner(split, **options).apply(plan, calibration=_batches())
    assert split.model.layers[0].mlp.down_proj.weight.device.type == DEVICE.type
    assert split.model.layers[2].mlp.down_proj.weight.device.type == "cpu"
    ids = _batches(seed=7)[0]
    # float64 on both, but the GPU half's products and the refit's factorisation round differently
    # (seen on an H200: 2.7e-7 at most).
    torch.testing.assert_close(_logits(split, ids), _logits(plain, ids), rtol=1e-5, atol=1e-6)


def test_cuda_recovery_stays_on_the_gpu():
    """LoRA recovery (KL to the dense model) trains and merges on the GPU."""
    _, teacher = _pair(FAMILIES[0], torch.float32)
    _, model = _pair(FAMILIES[0], torch.float32)
    pruner = Pruner(model, ratio=0.3, progress=False)
    pruner.apply(pruner.plan(_batches()))
    ids = _batches(seed=7)[0]
    before = _logits(model, ids)
    adaprune.recover(model, _batches(seed=3, count=8), steps=4, batch_size=2, teacher=teacher, progress=False)
    _assert_on_device(model)
    after = _logits(model, ids)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
