"""XLA's GPU compiler compiles the demo configs' train steps for one and two H100s, without a GPU (the CUDA
plugin of the `gpu` extra, driven by mvlp_jax/gpu_targets/h100.txtpb): they fit in the GPU's memory, the data
and fsdp axes put their collectives in the program, and attention runs in cuDNN's fused kernel.

The CUDA plugin is a 4.5 GB install that `make test` leaves out: these tests run under `make test-gpu` (its own
environment, .venv-gpu) and are skipped elsewhere, with the refusals that need no plugin tested always."""

import importlib.util
import os

import pytest

from mvlp_jax import configuration
from mvlp_jax.pretrain import aot
from mvlp_jax.tools.demo import load_config

HAS_GPU_COMPILER = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
needs_gpu_compiler = pytest.mark.skipif(
    not HAS_GPU_COMPILER, reason="XLA's GPU compiler (pip install -e '.[gpu]', make test-gpu)"
)


def _config(name: str, **overrides):
    file, _, variant = name.partition(":")
    config = load_config(os.path.splitext(os.path.basename(file))[0], variant)
    config.unlock()
    config.data.embeddings_dir = ""
    config.model.variant, config.model.decoder_depth = "mu/16", 1  # 2 blocks: compile time grows with depth
    config.model.dtype = "bfloat16"  # a GPU run's compute type (the demo's float32 is for CPUs): cuDNN's kernel
    return configuration.override(config, overrides)


@needs_gpu_compiler
@pytest.mark.parametrize("topology,mesh", [("h100-1", {}), ("h100-2", {"mesh.data": 1, "mesh.fsdp": 2})])
@pytest.mark.parametrize("name", ["configs/pretrain.py:demo", "configs/mae.py:demo", "configs/multitask.py:demo"])
def test_demo_config_compiles_for_h100s_fits_and_attends_in_cudnn(name, topology, mesh):
    (report,) = aot.compile_programs(_config(name, **mesh), topology, target_dim=576, programs=("train",))
    assert report.chip.family == "GPU" and report.chip.name == "H100" and report.chips == int(topology[-1])
    assert report.fits and 0 < report.total_bytes < 2**30 < report.chip.hbm_bytes
    assert report.kernel_calls > 0, "no cuDNN attention in the compiled step"
    assert report.flops > 0 and report.images_per_s_per_chip > 0
    if mesh:
        assert report.collectives["all-gather"]["count"] > 0  # fsdp gathers the sharded parameters
        assert report.collectives["reduce-scatter"]["count"] + report.collectives["all-reduce"]["count"] > 0
    assert "DOES NOT FIT" not in "\n".join(report.lines())


@needs_gpu_compiler
def test_xla_attention_holds_more_memory_than_cudnn_for_long_sequences():
    """B/16 at 512 px (1,025 tokens): cuDNN's kernel keeps no (L x L) weights for the backward pass."""
    config = _config("configs/mae.py:demo", **{"model.image_size": 512, "data.batch_size": 8})
    reports = {}
    for attention in ("auto", "xla"):
        config.model.attention = attention
        (reports[attention],) = aot.compile_programs(config, "h100-1", 0, ("train",))
    assert reports["auto"].kernel_calls > 0 == reports["xla"].kernel_calls
    assert reports["auto"].temp_bytes < reports["xla"].temp_bytes


@pytest.mark.parametrize(
    "topology,message",
    [
        ("h100-3", "GPUs per host must be 1, 2, 4 or 8"),
        ("v100-8", "or GPUs per host like h100-8"),
    ],
)
def test_a_gpu_topology_it_cannot_make_is_refused_by_name(topology, message):
    with pytest.raises(ValueError, match=message):
        aot.target(topology)


def test_without_the_cuda_plugin_the_gpu_compile_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "cuda" in name else object())
    with pytest.raises(ValueError, match=r"pip install -e '\.\[gpu\]'"):
        aot.target("h100-8")


@needs_gpu_compiler
@pytest.mark.parametrize("gpu", sorted(aot.GPU_PEAK_BF16))
def test_every_shipped_gpu_target_compiles_a_program(gpu):
    """Each target description parses and makes devices the compiler builds for (a 2-block MAE step)."""
    (report,) = aot.compile_programs(_config("configs/mae.py:demo"), f"{gpu}-1", 0, ("train",))
    assert report.chip.name == gpu.upper() and report.chip.hbm_bytes > 64 * 2**30  # 80 GB and up, all of them
    assert report.fits and report.kernel_calls > 0
