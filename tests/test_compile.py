"""``model.compile=true``: the encoder+projector compiled in place by torch.compile (inductor).

Compiled and eager agree on the same batch and weights (in one process: loss relative difference measured
1.8e-7 to 2.6e-6, gradient relative norm 6e-6 to 1.9e-5, on the 8- and 16-wide models, seeds 0-2); the state_dict
keys are the eager model's (no ``_orig_mod.`` prefix), so a compiled 2-rank `deepspeed` run's checkpoint loads
strictly into an eager model, an eager run resumes from it, and its ``backbone.pt`` exports. Inductor's CPU code
is deterministic across processes here: 6 compiled steps in one go and 3 + resume + 3 give the same losses and
the same weights bit for bit (max difference 0.0), so that is what the test asserts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.configio import load_config
from tests.helpers import TINY_OVERRIDES, launcher_env, write_synth_clips
from tests.test_precision import REPO, SMOKE, model_states, train

LOSS_REL_TOL = 1e-4  # measured <= 2.6e-6
GRAD_REL_TOL = 1e-3  # |g_compiled - g_eager| / |g_eager|, measured <= 1.9e-5


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    return write_synth_clips(tmp_path_factory.mktemp("clips") / "synth")


def _cfg(clips: str, *extra: str):
    from pretrain.config import PretrainConfig

    overrides = [*TINY_OVERRIDES, f"data.url={clips}", "data.num_workers=0", *extra]
    return load_config(PretrainConfig, SMOKE, overrides)


def _step(model, batch, cfg):
    """Loss and flattened gradient of one forward/backward on ``batch`` (BatchNorm in training mode)."""
    from pretrain.loss import info_nce

    model.zero_grad(set_to_none=True)
    out = info_nce(
        model(batch.images).float(), batch.positive_index, cfg.loss.temperature, fn_descriptors=batch.descriptors,
        fn_lambda=cfg.loss.fn_lambda, fn_mode=cfg.loss.fn_mode, fn_threshold=cfg.loss.fn_threshold,
        group_id=batch.group_id,
    )  # fmt: skip
    out.loss.backward()
    return out.loss.item(), torch.cat([p.grad.double().flatten() for p in model.parameters()])


def test_inductor_cache_follows_torch_extensions_dir_unless_set(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from pretrain.model import inductor_cache_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / ".cache/torch_extensions"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo sets
    assert inductor_cache_dir() == tmp_path / ".cache/torchinductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert inductor_cache_dir() == tmp_path / ".cache/torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert inductor_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert inductor_cache_dir() is None  # torch's own default


def test_compiled_matches_eager_on_the_same_batch_and_keeps_the_state_dict_keys(clips):
    from pretrain.model import ContrastiveEncoder, compile_in_place
    from pretrain.pipelines.torch_pipeline import TorchBatchPipeline

    cfg = _cfg(clips)
    pipe = TorchBatchPipeline(cfg, rank=0, world_size=1)
    batch = next(iter(pipe))
    pipe.close()
    torch.manual_seed(0)
    eager = ContrastiveEncoder(cfg.model)
    compiled = ContrastiveEncoder(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    assert compile_in_place(compiled) is compiled and compiled._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefix

    torch._dynamo.utils.counters.clear()
    loss_e, grad_e = _step(eager, batch, cfg)
    loss_c, grad_c = _step(compiled, batch, cfg)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    assert abs(loss_c - loss_e) / abs(loss_e) < LOSS_REL_TOL, (loss_c, loss_e)
    assert ((grad_c - grad_e).norm() / grad_e.norm()).item() < GRAD_REL_TOL
    # BatchNorm's running statistics are updated by the compiled forward as by the eager one.
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        assert torch.allclose(b_e.float(), b_c.float(), rtol=1e-4, atol=1e-6), name


@pytest.mark.integration
def test_compiled_run_resumes_bit_exactly_and_its_checkpoint_loads_eager(clips, tmp_path):
    from safetensors.torch import load_file

    from pretrain.model import ContrastiveEncoder, ResNetBackbone, load_backbone

    full, split = tmp_path / "full", tmp_path / "split"
    reference = train(full, clips, "model.compile=true", "max_steps=6")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert train(split, clips, "model.compile=true", "max_steps=6", "stop_at_step=3") == {
        s: reference[s] for s in (1, 2, 3)
    }
    assert train(split, clips, "model.compile=true", "max_steps=6", "resume=auto") == reference
    weights = model_states(full)["module"]
    resumed = model_states(split)["module"]
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)  # bit for bit

    # backbone.pt loads for evaluation and `python -m eval.export` exports it (the same weights, strict keys).
    backbone = load_backbone(full / "backbone.pt")
    assert all(torch.equal(v, weights[f"backbone.{k}"]) for k, v in backbone.state_dict().items())
    proc = subprocess.run(
        [sys.executable, "-m", "eval.export", "--checkpoint", str(full / "backbone.pt"), "--out", str(tmp_path / "x")],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(tmp_path / "x/model.safetensors")
    ResNetBackbone("resnet18", width=8).load_state_dict(exported, strict=True)
    assert all(torch.equal(v, weights[f"backbone.{k}"]) for k, v in exported.items())

    # The compiled run's checkpoint is an eager model's: strict load, and an eager run continues from it.
    ContrastiveEncoder(_cfg(clips).model).load_state_dict(weights, strict=True)
    more = train(full, clips, "model.compile=false", "max_steps=8", "resume=auto")
    assert sorted(more) == list(range(1, 9)) and {s: more[s] for s in reference} == reference
