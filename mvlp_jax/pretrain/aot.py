"""Ahead-of-time compile for a Cloud TPU slice or NVIDIA GPUs, on a machine without them: does a config fit, and how
fast can it be?

  python -m mvlp_jax.aot --config=configs/pretrain.py --topology=v4-32 --topology=h100-8 [--config.key=value ...]

For each topology the real compiler, TPU (libtpu: `pip install -e '.[tpu]'`) or XLA's GPU compiler (the CUDA
plugin: `pip install -e '.[gpu]'`, driven by a target description in mvlp_jax/gpu_targets/), compiles the
config's train step (every objective and schedule, accumulation, remat, the config's mesh) and the evaluation
binary's feature forward pass for the devices, and prints per device: argument / temporary / output bytes
against its memory, FLOPs and bytes accessed per step, arithmetic intensity against its roofline, the
collectives of the optimised HLO, the attention kernels (Pallas on TPU, cuDNN on GPU), images/s per device at
40% MFU, and the TPU compiler's own time estimate where it is valid. The GPU compiler has no cost analysis: a
GPU program's FLOPs and bytes are those of the same step lowered for one CPU device with XLA's attention
formula and unrolled blocks, divided over the devices. A cyclic schedule's FLOPs and bytes are those of a mean
step over its objectives, not of its costliest one. Exits 1, naming the knobs, when a program does not fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import time
from collections.abc import Iterator

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from mvlp_jax import configuration
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import combine, registry
from mvlp_jax.objectives.spec import image_shape
from mvlp_jax.pretrain import optim, startup, train_step
from mvlp_jax.runtime import cli, sharding, storage

FLAGS = flags.FLAGS
MFU_FOR_ESTIMATE = 0.4


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    peak_bf16_flops: float  # per chip
    hbm_bytes_per_s: float
    family: str = "TPU"  # "TPU" or "GPU"
    usable_fraction: float = 1.0  # of hbm_bytes a process gets (JAX preallocates a share of a GPU's memory)

    @property
    def unit(self) -> str:
        return "chip" if self.family == "TPU" else "GPU"

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes * self.usable_fraction


# Public per-chip figures of Cloud TPU generations (device_kind substring -> chip).
CHIPS = {
    "v6 lite": Chip("v6e", 32 * 2**30, 918e12, 1.64e12),
    "v5 lite": Chip("v5e", 16 * 2**30, 197e12, 0.819e12),
    "v5p": Chip("v5p", 95 * 2**30, 459e12, 2.765e12),
    "v5": Chip("v5p", 95 * 2**30, 459e12, 2.765e12),
    "v4": Chip("v4", 32 * 2**30, 275e12, 1.228e12),
}
# Accelerator-type names (what `gcloud ... --accelerator-type` takes) -> topology names libtpu knows.
# v4 types count TensorCores (2 per chip); v5e/v6e types count chips.
ALIASES = {
    "v4-8": "v4:2x2x1",
    "v4-16": "v4:2x2x2",
    "v4-32": "v4:2x2x4",
    "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4",
    "v5e-1": "v5e:1x1",
    "v5e-4": "v5e:2x2",
    "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8",
    "v5e-128": "v5e:8x16",
    "v5e-256": "v5e:16x16",
    "v6e-4": "v6e:2x2",
    "v6e-8": "v6e:2x4",
    "v6e-16": "v6e:4x4",
    "v6e-64": "v6e:8x8",
    "v6e-256": "v6e:16x16",
}
# NVIDIA GPUs -> dense bfloat16 tensor-core peak per GPU (NVIDIA's datasheets, SXM parts, no sparsity). Memory
# and bandwidth come from the target description the compiler reads (mvlp_jax/gpu_targets/NAME.txtpb).
GPU_PEAK_BF16 = {"a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12}
GPU_TARGETS = os.path.join(os.path.dirname(__file__), "gpu_targets")
GPU_MEM_FRACTION = 0.75  # what JAX preallocates of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise
# 'h100-8': one host with 8 GPUs; '2xh100-8': two such hosts.
_GPU_TOPOLOGY = re.compile(r"(?:(\d+)x)?(" + "|".join(GPU_PEAK_BF16) + r")-(\d+)")
ATTENTION_KERNELS = ('custom_call_target="tpu_custom_call"', 'custom_call_target="__cudnn$fmha')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_COLLECTIVE_LINE = re.compile(r"=\s*(.+?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def target(topology: str) -> tuple[list, Chip]:
    """The devices of a topology and their chip: a Cloud TPU slice ('v4-32', 'v5e:4x4') or NVIDIA GPUs
    ('h100-8', '2xh100-8')."""
    if _GPU_TOPOLOGY.fullmatch(topology):
        return gpu_devices(topology)
    devices = tpu_devices(topology)
    return devices, chip_of(devices[0])


def gpu_devices(topology: str) -> tuple[list, Chip]:
    """HOSTSxGPU-N: N GPUs (1, 2, 4 or 8) on each of HOSTS hosts, from XLA's GPU compiler and the GPU's target
    description, without a GPU."""
    from jax.experimental import topologies

    hosts, gpu, per_host = _GPU_TOPOLOGY.fullmatch(topology).groups()
    hosts, per_host = int(hosts or 1), int(per_host)
    if per_host not in (1, 2, 4, 8) or hosts < 1:
        raise ValueError(f"--topology={topology}: GPUs per host must be 1, 2, 4 or 8 (e.g. h100-8, 2xh100-8)")
    if importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("jax_cuda13_plugin") is None:
        raise ValueError("compiling for GPUs needs XLA's GPU compiler (the CUDA plugin): pip install -e '.[gpu]'")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here: compile only
    description = open(os.path.join(GPU_TARGETS, f"{gpu}.txtpb")).read()
    devices = topologies.get_topology_desc(
        platform="cuda", target_config=description, topology=f"1x{hosts}x{per_host}"
    ).devices
    fields = re.sub(r"#.*", "", description)  # the values, not the comments that say where they come from

    def field(name: str) -> float:
        found = re.search(rf"\b{name}:\s*([-+.\deE]+)", fields)
        if not found:
            raise ValueError(f"{GPU_TARGETS}/{gpu}.txtpb has no {name}")
        return float(found.group(1))

    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
    return list(devices), Chip(
        gpu.upper(),
        field("device_memory_size"),
        GPU_PEAK_BF16[gpu],
        field("memory_bandwidth"),
        family="GPU",
        usable_fraction=fraction,
    )


def tpu_devices(topology: str) -> list:
    """The devices of a Cloud TPU slice ('v4-32' or 'v4:2x2x4'), from libtpu, without a TPU."""
    from jax.experimental import topologies

    name = ALIASES.get(topology, topology)
    if ":" not in name:
        raise ValueError(
            f"--topology={topology}: use an accelerator type ({', '.join(ALIASES)}), a topology "
            f"name like v4:2x2x4 or v5e:4x4, or GPUs per host like h100-8 or 2xh100-8"
        )
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a second compile beside a running one
    try:
        import libtpu  # noqa: F401
    except ImportError as error:
        raise ValueError("compiling for TPU needs libtpu: pip install -e '.[tpu]'") from error
    megacore = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **megacore).devices)
    except Exception as error:  # noqa: BLE001 - libtpu refuses a shape it does not make as a runtime error
        raise ValueError(
            f"--topology={topology}: libtpu makes no such slice ({str(error).splitlines()[0][:200]}); "
            f"use an accelerator type ({', '.join(ALIASES)}) or a topology name of a real slice shape "
            f"(v4:2x2x4, v5e:4x4, v6e:8x8)"
        ) from None


def chip_of(device) -> Chip:
    kind = device.device_kind.lower()
    for key, chip in CHIPS.items():
        if key in kind:
            return chip
    raise ValueError(f"no HBM / peak figures for device kind {device.device_kind!r}")


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {count, bytes}} of the collectives in optimised HLO (async pairs counted once, at -start)."""
    out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if not match:
            continue
        shapes = _SHAPE.findall(match.group(1))
        if match.group(3) and len(shapes) > 1:  # an async start's tuple holds (operands..., result)
            shapes = shapes[-1:]
        size = sum(_DTYPE_BYTES[t] * _prod(dims) for t, dims in shapes)
        out[match.group(2)]["count"] += 1
        out[match.group(2)]["bytes"] += size
    return out


def _prod(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


@dataclasses.dataclass
class Report:
    program: str
    topology: str
    chips: int
    mesh: dict
    chip: Chip
    argument_bytes: float
    temp_bytes: float
    output_bytes: float
    alias_bytes: float
    code_bytes: float
    flops: float
    bytes_accessed: float
    optimal_seconds: float
    collectives: dict
    compile_seconds: float
    images_per_step: int  # what a step's batch holds: images (a study's view slots each), or volumes
    attention: str = "auto"
    examples: str = "images"  # what images_per_step counts, in words: "images", or "volumes" (a ViT3D)
    kernel_calls: int = 0  # attention kernels in the optimised HLO: Pallas flash (TPU), cuDNN fused (GPU)
    loops: bool = False  # while loops (scan, accumulation): XLA's cost analysis counts their bodies once
    refused: bool = False  # the compiler refused the program for HBM (temp_bytes: what it asked for)

    @property
    def total_bytes(self) -> float:
        """What the program holds in HBM at its peak: arguments, temporaries, outputs not aliased to an
        argument (donated state), and its code."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.refused and self.total_bytes <= self.chip.usable_bytes

    @property
    def intensity(self) -> float:
        return self.flops / max(self.bytes_accessed, 1.0)

    @property
    def ridge(self) -> float:
        """FLOPs per byte where the chip turns from memory- to compute-bound."""
        return self.chip.peak_bf16_flops / self.chip.hbm_bytes_per_s

    @property
    def images_per_s_per_chip(self) -> float:
        """At 40% MFU; NaN where loops make the FLOPs a lower bound."""
        seconds = self.flops / (MFU_FOR_ESTIMATE * self.chip.peak_bf16_flops)
        return self.images_per_step / self.chips / seconds if seconds > 0 and not self.loops else float("nan")

    @property
    def estimate_valid(self) -> bool:
        """The compiler's time estimate counts only when positive, no faster than the chip's peak allows, and
        the FLOPs are whole (no loops). It came out as (estimate - k), k a whole number of seconds, in programs
        with the contrastive head's MLP projection (one per such head and pass): a number not to be read."""
        return (
            self.optimal_seconds > 0
            and not self.loops
            and self.optimal_seconds >= self.flops / self.chip.peak_bf16_flops
        )

    def summary(self) -> dict:
        """The figures as plain values (for tables and JSON)."""
        return {
            "program": self.program,
            "topology": self.topology,
            "chips": self.chips,
            "chip": self.chip.name,
            "attention": self.attention,
            "kernel_calls": self.kernel_calls,
            "loops": self.loops,
            "refused": self.refused,
            "total_bytes": self.total_bytes,
            "hbm_bytes": self.chip.hbm_bytes,
            "usable_bytes": self.chip.usable_bytes,
            "fits": self.fits,
            "argument_bytes": self.argument_bytes,
            "temp_bytes": self.temp_bytes,
            **(
                {}
                if self.refused
                else {
                    "flops": self.flops,
                    "intensity": self.intensity,
                    "images_per_s_per_chip": self.images_per_s_per_chip,
                    "examples": self.examples,  # what the figure above counts: images or volumes
                }
            ),
            "optimal_seconds": self.optimal_seconds if self.estimate_valid else None,
            "compile_seconds": round(self.compile_seconds),
        }

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / 2**30:.2f} GiB"
        unit = self.chip.unit
        usable = (
            ""
            if self.chip.usable_fraction == 1.0
            else f" ({gib(self.chip.usable_bytes)} usable: JAX preallocates {self.chip.usable_fraction:.0%}, "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION)"
        )
        kernels = "Pallas kernel" if self.chip.family == "TPU" else "cuDNN attention"
        if self.refused:
            return [
                f"{self.program} on {self.topology}: {self.chips} x {self.chip.family} {self.chip.name}, mesh "
                f"{self.mesh}, attention {self.attention}: the compiler refused it after "
                f"{self.compile_seconds:.0f} s",
                f"  HBM per {unit}: DOES NOT FIT: {gib(self.temp_bytes)} of temporaries alone, the {unit} has "
                f"{gib(self.chip.hbm_bytes)}",
            ]
        comm = (
            ", ".join(
                f"{op} {c['count']} ({c['bytes'] / 2**20:.1f} MiB)" for op, c in self.collectives.items() if c["count"]
            )
            or "none"
        )
        estimate = (
            f"{self.optimal_seconds * 1e3:.2f} ms"
            if self.estimate_valid
            else "none (the GPU compiler gives none)"
            if self.chip.family == "GPU"
            else f"not valid (the compiler says {self.optimal_seconds:.4g} s)"
        )
        counted = " (counted on one CPU: XLA's formula, divided over the GPUs)" if self.chip.family == "GPU" else ""
        return [
            f"{self.program} on {self.topology}: {self.chips} x {self.chip.family} {self.chip.name}, mesh "
            f"{self.mesh}, attention {self.attention} ({self.kernel_calls} {kernels} calls), compiled in "
            f"{self.compile_seconds:.0f} s",
            f"  HBM per {unit}: {gib(self.total_bytes)} of {gib(self.chip.hbm_bytes)}{usable} "
            f"({'fits' if self.fits else 'DOES NOT FIT'}): arguments {gib(self.argument_bytes)}, temporaries "
            f"{gib(self.temp_bytes)}, outputs {gib(self.output_bytes)} ({gib(self.alias_bytes)} aliased to "
            f"donated arguments), code {gib(self.code_bytes)}",
            f"  per {unit} and step{counted}: {self.flops:.3e} FLOPs, {self.bytes_accessed:.3e} bytes accessed, "
            f"arithmetic intensity {self.intensity:.0f} FLOP/B (roofline ridge {self.ridge:.0f})"
            + (
                "; LOWER BOUNDS: the program loops (scan or accumulation) and XLA counts a loop body once"
                if self.loops
                else ""
            ),
            f"  collectives: {comm}",
            f"  at {MFU_FOR_ESTIMATE:.0%} MFU: "
            + (
                "not estimated (loops)"
                if self.loops
                else f"{self.images_per_s_per_chip:.1f} {self.examples}/s per {unit}"
            )
            + f"; compiler's time estimate: {estimate}",
        ]


def _memory_and_cost(compiled) -> dict[str, float]:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # none from the GPU compiler
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "optimal_seconds": float(cost.get("optimal_seconds", -1.0)),
    }


def compile_programs(
    config: ml_collections.ConfigDict, topology: str, target_dim: int, programs: tuple[str, ...] = ("train", "features")
) -> list[Report]:
    """Compiles `programs` of `config` for `topology` (a TPU slice or GPUs) and reports each."""
    configuration.validate(config)
    devices, chip = target(topology)
    parts = _parts(config, devices, target_dim if _needs_targets(config) else 0)
    startup.check_batch(config, parts.mesh)
    images = config.data.batch_size * config.data.max_views  # a study's view slots, padding included
    reports = []
    for program in programs:
        start = time.perf_counter()
        common = dict(
            program=program,
            topology=topology,
            chips=len(devices),
            mesh=dict(parts.mesh.shape),
            chip=chip,
            images_per_step=images,
            attention=config.model.attention,
            examples="volumes" if config.model.encoder == "vit3d" else "images",
        )
        try:
            compiled = _compile(program, parts)
        except jax.errors.JaxRuntimeError as error:
            needed = _hbm_shortfall(str(error))
            if needed is None:
                raise
            reports.append(
                Report(
                    **common,
                    compile_seconds=time.perf_counter() - start,
                    collectives={},
                    argument_bytes=0.0,
                    temp_bytes=needed,
                    output_bytes=0.0,
                    alias_bytes=0.0,
                    code_bytes=0.0,
                    flops=float("nan"),
                    bytes_accessed=float("nan"),
                    optimal_seconds=-1.0,
                    refused=True,
                )
            )
            continue
        hlo = compiled.as_text()
        measured = _memory_and_cost(compiled)
        loops = re.search(r"\swhile\(", hlo) is not None
        if chip.family == "GPU":
            flops, bytes_accessed, loops = counted_on_one_cpu(program, config, parts.target_dim)
            measured.update(
                flops=flops / len(devices), bytes_accessed=bytes_accessed / len(devices), optimal_seconds=-1.0
            )
        elif program == "train" and combine.cyclic(config):
            # XLA's cost analysis counts the costliest objective's branch on every step. The compiler's own time
            # estimate has the same fault, so it is dropped.
            share = _cyclic_share(parts)
            measured.update(
                flops=measured["flops"] * share, bytes_accessed=measured["bytes_accessed"] * share, optimal_seconds=-1.0
            )
        reports.append(
            Report(
                **common,
                compile_seconds=time.perf_counter() - start,
                collectives=collectives(hlo),
                kernel_calls=sum(hlo.count(k) for k in ATTENTION_KERNELS),
                loops=loops,
                **measured,
            )
        )
    return reports


@dataclasses.dataclass
class _Parts:
    """A config's model, optimiser and abstract state laid out on a mesh: what its programs are made of."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: object
    tx: object
    abstract: object
    state_sh: object
    target_dim: int

    @property
    def batch_shapes(self) -> dict:
        return jax.eval_shape(
            lambda: train_step.example_batch(self.config, self.target_dim, batch=self.config.data.batch_size)
        )


def _needs_targets(config: ml_collections.ConfigDict) -> bool:
    return registry.needs_targets(config)


def _parts(config: ml_collections.ConfigDict, devices: list, target_dim: int) -> _Parts:
    mesh = sharding.make_mesh(config, devices)
    model, tx = Pretrainer(config, target_dim), optim.make(config)
    _, abstract, state_sh = train_step.state_layout(model, tx, config, mesh)
    return _Parts(config, mesh, model, tx, abstract, state_sh, target_dim)


def _cyclic_share(parts: _Parts) -> float:
    return train_step.cyclic_flops_share(
        parts.model, parts.tx, parts.config, parts.abstract, parts.state_sh, parts.mesh, parts.batch_shapes
    )


def _lower(program: str, parts: _Parts):
    if program == "train":
        return train_step.lower_train_step(
            train_step.make_train_step(parts.model, parts.tx, parts.config),
            parts.abstract,
            parts.state_sh,
            parts.mesh,
            parts.batch_shapes,
        )
    if program == "features":
        return _lower_features(parts)
    raise ValueError(f"unknown program {program!r}: train or features")


def _compile(program: str, parts: _Parts):
    lowered = _lower(program, parts)
    with sharding.active(parts.mesh):
        return lowered.compile()


def counted_on_one_cpu(program: str, config: ml_collections.ConfigDict, target_dim: int) -> tuple[float, float, bool]:
    """(FLOPs, bytes accessed, loops) of a whole step of `program`, from XLA's cost analysis of the same program
    lowered (not compiled) for one CPU device with XLA's attention formula, XLA's own ops and unrolled blocks
    (whatever model.scan), a cyclic step's averaged over its objectives. `loops`: it still loops (gradient
    accumulation: its micro-steps loop), so the counts are a lower bound."""
    counted = config.copy_and_resolve_references()
    counted.model.attention, counted.model.scan = "xla", False
    if counted.model.dtype == "auto":
        counted.model.dtype = "bfloat16"  # what 'auto' computes in on an accelerator (float32 on this CPU)
    counted.mesh.data, counted.mesh.fsdp, counted.mesh.model = 1, 1, 1
    with _xla_ops_only():
        parts = _parts(counted, jax.devices("cpu")[:1], target_dim)
        lowered = _lower(program, parts)
        share = _cyclic_share(parts) if program == "train" else 1.0
    cost = lowered.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    loops = program == "train" and config.optim.accum_steps > 1  # (the random bits' small loops do not count)
    return float(cost.get("flops", 0.0)) * share, float(cost.get("bytes accessed", 0.0)) * share, loops


@contextlib.contextmanager
def _xla_ops_only() -> Iterator[None]:
    """No MKL custom calls in programs traced here (XLA cannot count what a custom call computes)."""
    before = os.environ.get("MVLP_JAX_CPU_BLAS")
    os.environ["MVLP_JAX_CPU_BLAS"] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MVLP_JAX_CPU_BLAS"]
        else:
            os.environ["MVLP_JAX_CPU_BLAS"] = before


_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?required for HLO temporaries \(([\d.]+)([KMGT])\)")


def _hbm_shortfall(message: str) -> float | None:
    """Bytes of temporaries the compiler asked for when it refused a program for HBM, else None."""
    match = _OUT_OF_HBM.search(message)
    if not match:
        return None
    return float(match.group(1)) * 2 ** (10 * "KMGT".index(match.group(2)) + 10)


def _lower_features(parts: _Parts):
    """The evaluation binary's forward: images -> pooled features, batch-sharded, parameters as trained."""
    pooling = "map" if parts.target_dim else "mean"
    images = jax.ShapeDtypeStruct((parts.config.data.batch_size, *image_shape(parts.config)[0]), jax.numpy.float32)
    forward = lambda p, x: parts.model.apply({"params": p}, x, pooling, method=Pretrainer.features)
    jitted = jax.jit(
        forward,
        in_shardings=(parts.state_sh.params, sharding.batch_sharding(parts.mesh, len(images.shape))),
        out_shardings=sharding.replicated(parts.mesh),
    )
    with sharding.active(parts.mesh):
        return jitted.lower(parts.abstract.params, images)


def too_big_advice(report: Report, config: ml_collections.ConfigDict) -> str:
    per_chip, unit = config.data.batch_size // report.chips, report.chip.unit
    fraction = (
        ""
        if report.chip.usable_fraction == 1.0
        else f" of which JAX preallocates {report.chip.usable_fraction:.0%} (XLA_PYTHON_CLIENT_MEM_FRACTION)"
    )
    return (
        f"{report.program} needs {report.total_bytes / 2**30:.2f} GiB per {unit}, the {report.chip.name} has "
        f"{report.chip.hbm_bytes / 2**30:.0f} GiB{fraction}. To fit: a smaller per-{unit} batch (now {per_chip}: "
        f"--config.data.batch_size), rematerialisation (--config.model.remat=dots or full; now "
        f"{config.model.remat!r}), sharding the parameters and optimizer state (--config.mesh.fsdp; now "
        f"{config.mesh.fsdp}), or gradient accumulation (--config.optim.accum_steps; now "
        f"{config.optim.accum_steps})"
    )


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "configs/pretrain.py[:variant]", lock_config=True)
    flags.DEFINE_multi_string(
        "topology",
        ["v4-32"],
        "What to compile for: a TPU accelerator type (v4-32, v5e-64, "
        "...) or topology name (v4:2x2x4, v5e:8x8), or NVIDIA GPUs per host (a100-8, h100-1, "
        "h200-4, b200-8; 2xh100-8: two hosts); repeat for several.",
    )
    flags.DEFINE_multi_enum("program", ["train", "features"], ["train", "features"], "Programs to compile.")
    flags.DEFINE_multi_enum(
        "attention",
        [],
        ["auto", "xla", "tpu_splash", "tpu_flash", "cudnn"],
        "Attention implementations to compile each program with (repeat to compare their memory); "
        "default: the config's.",
    )
    flags.DEFINE_integer(
        "target_dim",
        4096,
        "LLM hidden size of the targets (4096: Llama-2-7b), when the config has no embeddings dir to read it from.",
    )
    flags.mark_flags_as_required(["config"])


def _target_dim(config: ml_collections.ConfigDict) -> int:
    path = storage.join(config.data.embeddings_dir, "manifest.json") if config.data.embeddings_dir else ""
    if path and storage.path(path).exists():
        return int(storage.read_json(path)["hidden_size"])
    return FLAGS.target_dim


def main(argv: list[str]) -> int:
    del argv
    status = 0
    for topology in FLAGS.topology:
        for attention in FLAGS.attention or [FLAGS.config.model.attention]:
            config = FLAGS.config.copy_and_resolve_references()
            config.model.attention = attention
            for report in compile_programs(config, topology, _target_dim(config), tuple(FLAGS.program)):
                print("\n".join(report.lines()), flush=True)
                if not report.fits:
                    print(f"error: {too_big_advice(report, config)}", file=sys.stderr)
                    status = 1
    return status


def run_binary() -> None:
    """`python -m mvlp_jax.aot`."""
    define_flags()
    cli.run("mvlp_jax.aot", main, config_keys=configuration.SPEC)
