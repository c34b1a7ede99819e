"""The real TPU compiler (libtpu, installed by `make test` through the `tpu` extra) compiles every demo config's
train step for a v4 slice with both data and fsdp parallelism, without a TPU: it fits in HBM, fsdp shards the
parameters (per-chip argument bytes shrink, all-gathers appear), and the evaluation forward compiles too.
The encoders are cut to two blocks to keep CI short; `python -m mvlp_jax.aot` compiles the full configs."""

import os

import pytest

from mvlp_jax import configuration
from mvlp_jax.pretrain import aot
from mvlp_jax.tools.demo import load_config

SLICE = "v4-8"  # 4 chips (v4:2x2x1, megacore)
MESH = {"data": 2, "fsdp": 2}


def _config(name: str, **overrides):
    file, _, variant = name.partition(":")
    config = load_config(os.path.splitext(os.path.basename(file))[0], variant)
    config.unlock()
    config.data.embeddings_dir = ""
    # 2 encoder blocks and 1 decoder block: compile time grows with depth, and every op of the config stays
    config.model.variant, config.model.decoder_depth = "mu/16", 1
    overrides = {key if "." in key else f"mesh.{key}": value for key, value in overrides.items()}
    return configuration.override(config, {**{f"mesh.{a}": n for a, n in MESH.items()}, **overrides})


@pytest.mark.parametrize(
    "name",
    [
        "configs/pretrain.py:demo",
        "configs/mflag.py:demo",
        "configs/multitask.py:demo",
        "configs/pretrain.py:demo,vitdet",
    ],
)
def test_demo_config_compiles_for_a_tpu_slice_and_fits(name):
    (report,) = aot.compile_programs(_config(name), SLICE, target_dim=576, programs=("train",))
    assert report.chip.name == "v4" and report.chips == 4 and report.mesh == {**MESH, "model": 1}
    assert report.fits and 0 < report.total_bytes < 2**30
    assert report.flops > 0 and report.bytes_accessed > 0
    assert report.collectives["all-gather"]["count"] > 0  # fsdp gathers the sharded parameters
    assert report.collectives["all-reduce"]["count"] > 0  # the data axis reduces gradients / batch losses
    assert "DOES NOT FIT" not in "\n".join(report.lines())


def test_fsdp_shards_the_parameters_and_the_evaluation_forward_compiles():
    full_depth = {"model.variant": "Ti/16", "model.decoder_depth": 8}  # widths fsdp divides, as trained
    (sharded,) = aot.compile_programs(_config("configs/mae.py:demo", **full_depth), SLICE, 0, ("features",))
    (replicated,) = aot.compile_programs(
        _config("configs/mae.py:demo", data=4, fsdp=1, **full_depth), SLICE, 0, ("features",)
    )
    # the forward's arguments are the parameters (and a batch split 4 ways either way): fsdp=2 halves them
    images = replicated.images_per_step // 4 * 96 * 96 * 4
    ratio = (sharded.argument_bytes - images) / (replicated.argument_bytes - images)
    assert 0.45 < ratio < 0.6, ratio
    assert replicated.collectives["all-gather"]["count"] < sharded.collectives["all-gather"]["count"]
    assert sharded.program == "features" and sharded.fits and sharded.flops > 0


def test_collectives_are_read_from_hlo_text():
    hlo = "\n".join(
        [
            "  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %p), replica_groups={{0,1}}",
            "  %ags = (bf16[8,128]{1,0}, bf16[16,128]{1,0}) all-gather-start(bf16[8,128]{1,0} %x), dimensions={0}",
            "  %agd = bf16[16,128]{1,0} all-gather-done((bf16[8,128]{1,0}, bf16[16,128]{1,0}) %ags)",
            "  ROOT %rs = f32[2,3]{1,0} reduce-scatter(f32[4,3]{1,0} %y), dimensions={0}",
            "  %add = f32[1024]{0} add(f32[1024]{0} %a, f32[1024]{0} %b)",
        ]
    )
    found = aot.collectives(hlo)
    assert found["all-reduce"] == {"count": 1, "bytes": 4096}
    assert found["all-gather"] == {"count": 1, "bytes": 16 * 128 * 2}  # the start's result, the done not again
    assert found["reduce-scatter"] == {"count": 1, "bytes": 24}
    assert found["all-to-all"]["count"] == 0


def test_a_program_too_big_for_hbm_is_refused_naming_the_knobs():
    report = aot.Report(
        program="train",
        topology=SLICE,
        chips=4,
        mesh=MESH,
        chip=aot.CHIPS["v4"],
        argument_bytes=30 * 2**30,
        temp_bytes=8 * 2**30,
        output_bytes=1e9,
        alias_bytes=1e9,
        code_bytes=1e8,
        flops=1e12,
        bytes_accessed=1e11,
        optimal_seconds=-3.0,
        collectives={},
        compile_seconds=1.0,
        images_per_step=256,
    )
    assert not report.fits and "DOES NOT FIT" in report.lines()[1]
    assert "not valid" in report.lines()[-1]  # a negative compiler estimate is never printed as a time
    advice = aot.too_big_advice(report, _config("configs/pretrain.py:demo"))
    for knob in ("data.batch_size", "model.remat", "mesh.fsdp", "optim.accum_steps"):
        assert knob in advice


def test_aot_refuses_an_unknown_topology_clearly():
    with pytest.raises(ValueError, match="--topology=v9-3: use an accelerator type"):
        aot.tpu_devices("v9-3")
    assert os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD") in (None, "1")


@pytest.mark.parametrize(
    "name,size,program", [("configs/mae.py:demo", 512, "features"), ("configs/pretrain.py:demo,vitdet", 224, "train")]
)
def test_auto_attention_puts_the_splash_kernel_into_sharded_tpu_programs(name, size, program):
    """On TPU, 'auto' runs attention in the Pallas splash kernel, as 'tpu_flash' does in the flash kernel (per
    shard on a data x fsdp mesh): ViT at 512 px (1,025 tokens) and ViTDet's padded 14 x 14 windows (196 tokens,
    a key mask), forward and backward (the train program: splash alone, each compile of it takes a minute here).
    'xla' has no kernel call."""
    reports = {}
    for attention in ("xla", "tpu_flash", "auto") if program == "features" else ("auto",):
        config = _config(name, **{"model.image_size": size, "model.attention": attention})
        (reports[attention],) = aot.compile_programs(config, SLICE, 576, (program,))
    if program == "features":
        assert reports["xla"].kernel_calls == 0 and reports["tpu_flash"].kernel_calls >= 2
    assert reports["auto"].kernel_calls >= 2  # one per encoder block (and its backward)
    assert reports["auto"].fits and reports["auto"].flops > 0
    assert f"attention auto ({reports['auto'].kernel_calls} Pallas kernel calls)" in reports["auto"].lines()[0]


def test_a_program_the_compiler_refuses_for_hbm_is_reported_as_not_fitting():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(38.05G) exceeds available HBM (30.75G)."
    )
    assert aot._hbm_shortfall(message) == 38.05 * 2**30 and aot._hbm_shortfall("INTERNAL: other") is None
    report = aot.Report(
        program="train",
        topology="v4-32",
        chips=16,
        mesh=MESH,
        chip=aot.CHIPS["v4"],
        argument_bytes=0.0,
        temp_bytes=38.05 * 2**30,
        output_bytes=0.0,
        alias_bytes=0.0,
        code_bytes=0.0,
        flops=float("nan"),
        bytes_accessed=float("nan"),
        optimal_seconds=-1.0,
        collectives={},
        compile_seconds=60.0,
        images_per_step=256,
        refused=True,
    )
    assert not report.fits and "DOES NOT FIT: 38.05 GiB of temporaries alone" in report.lines()[1]
    assert "flops" not in report.summary() and report.summary()["fits"] is False
