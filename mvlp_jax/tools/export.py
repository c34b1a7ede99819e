"""Export a pretraining run's encoder for use outside mvlp_jax: a transformers checkpoint and a model card.

  python -m mvlp_jax.export --workdir=runs/demo/pretrain [--step=N] --output_dir=exports/pretrain

ViT encoders become a transformers `ViTMAEModel` (runs that trained the masked autoencoder) or `ViTModel`
(`model.safetensors` + `config.json`, one input channel as trained) with a `preprocessor_config.json` of the
run's resize and normalisation. The other trained heads (attention pooling, projections, DINO / box heads)
go to `heads.safetensors` under their Flax parameter paths. ViTDet has no transformers class: its weights go to
`encoder.safetensors` under their Flax paths, and the card says so. `README.md` is the model card.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from mvlp_jax.data import views
from mvlp_jax.evaluation.features import Encoder
from mvlp_jax.models.convert_hf import vit_params_to_hf
from mvlp_jax.models.transformer import sincos_2d
from mvlp_jax.models.vit import variant
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import cli, sharding, storage

KNOWN_LICENCES = {
    "mimic_cxr": "MIMIC-CXR: PhysioNet Credentialed Health Data License 1.5.0; weights trained on it are shared "
    "only under its terms (credentialed users, no re-identification).",
    "covid_notes": "The COVID-19 image data collection: a licence per image (CC BY, CC BY-NC-SA, ...), listed in "
    "data_prep/sample/covid_notes/manifest.csv and data_prep/sample/ATTRIBUTION.md.",
}


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{'pool/map/probe': array, ...}: Flax parameter paths joined by '/', float32 numpy."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


def position_table(vit_params: dict, config) -> np.ndarray:
    """(1, 1 + N, width): what the ViT adds to [CLS, patches] at the trained size; a study encoder's patches also
    get the frontal view-type embedding (an exported model reads one image, a study of one frontal view)."""
    size = variant(config.model.variant)
    grid = config.model.image_size // size["patch_size"]
    learned = vit_params["embedding"].get("pos_embedding")
    if learned is not None:
        table = np.array(learned, np.float32)
    else:
        table = np.concatenate([np.zeros((1, size["width"]), np.float32), sincos_2d(grid, grid, size["width"])])[None]
    if "view_embedding" in vit_params:
        table[:, 1:] += np.asarray(vit_params["view_embedding"][0], np.float32)
    return table


def hf_model(encoder: Encoder):
    """The transformers model holding the run's ViT encoder (strict state-dict load: every weight mapped)."""
    cli.require_extra("export", "a transformers ViT of the encoder")
    import torch
    from transformers import ViTConfig, ViTMAEConfig, ViTMAEModel, ViTModel

    c = encoder.config
    size = variant(c.model.variant)
    common = dict(
        hidden_size=size["width"],
        num_hidden_layers=size["depth"],
        num_attention_heads=size["num_heads"],
        intermediate_size=size["mlp_dim"],
        image_size=c.model.image_size,
        patch_size=size["patch_size"],
        num_channels=views.channels(c),
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if "masked_model" in encoder.params:  # mask_ratio 0: an encoder of whole images (see the card)
        model = ViTMAEModel(ViTMAEConfig(**common, mask_ratio=0.0))
    else:
        model = ViTModel(ViTConfig(**common), add_pooling_layer=False)
    vit = jax.device_get(encoder.params["encoder"])
    state = vit_params_to_hf(vit, position_table(vit, c))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return model.eval()


MARKER = "export.json"  # what an export wrote, and from which run


def check_output_dir(output_dir: str, workdir: str, overwrite: bool) -> None:
    """Refuses a folder holding files that are not an earlier export of this run (unless `overwrite`), so an
    export never writes its README.md or config.json over someone else's beside their other files."""
    folder = storage.path(output_dir)
    present = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if not present or overwrite:
        return
    marker = folder / MARKER
    earlier = storage.read_json(marker) if marker.exists() else {}
    if earlier.get("workdir") == storage.canonical(workdir):
        return
    whose = f"an export of another run ({earlier['workdir']})" if earlier else "not an export of this run"
    raise cli.UserError(
        f"--output_dir={output_dir} holds {len(present)} files ({', '.join(present[:5])}"
        f"{', ...' if len(present) > 5 else ''}), {whose}: choose an empty folder, or pass "
        f"--overwrite to write this export over same-named files"
    )


def export(encoder: Encoder, output_dir: str, results: str = "", workdir: str = "") -> str:
    """Writes the export of `encoder` (pretrain/encoder.load of `workdir`) into `output_dir` (local or gs://: made
    in a local folder, then uploaded) with `export.json` naming the run; returns the card's path. The files an
    earlier export of the folder wrote and this one does not are removed."""
    cli.require_extra("export", "exporting to Hugging Face")
    folder = storage.path(output_dir)
    earlier = storage.read_json(folder / MARKER).get("files", []) if (folder / MARKER).exists() else []
    with tempfile.TemporaryDirectory(prefix="mvlp-export-") as staging:
        _write_export(encoder, staging, results)
        written = sorted(os.listdir(staging)) + [MARKER]
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump(
                {
                    "workdir": storage.canonical(workdir) if workdir else "",
                    "checkpoint": encoder.source,
                    "step": encoder.step,
                    "files": written,
                },
                f,
                indent=2,
            )
        storage.copy_tree(staging, output_dir)
    for stale in set(earlier) - set(written):
        (folder / stale).unlink(missing_ok=True)
    return storage.join(output_dir, "README.md")


def _write_export(encoder: Encoder, folder: str, results: str) -> None:
    from safetensors.numpy import save_file

    params = jax.device_get(encoder.params)
    c = encoder.config
    with open(os.path.join(folder, "training_config.json"), "w") as f:
        json.dump(c.to_dict(), f, indent=2, sort_keys=True, default=list)
    heads = {k: v for k, v in params.items() if k not in ("encoder", "masked_model")}
    if heads:
        save_file(flat(heads), os.path.join(folder, "heads.safetensors"))
    if c.model.encoder == "vit":
        from transformers import ViTImageProcessor

        model = hf_model(encoder)
        model.save_pretrained(folder)
        ViTImageProcessor(
            do_resize=True,
            size={"height": c.model.image_size, "width": c.model.image_size},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[c.data.mean] * views.channels(c),
            image_std=[c.data.std] * views.channels(c),
        ).save_pretrained(folder)
        kind = type(model).__name__
    else:
        save_file(flat(params["encoder"]), os.path.join(folder, "encoder.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(c.to_dict(), f, indent=2, sort_keys=True, default=list)
        kind = "ViTDet (no transformers class)"
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(encoder, kind, sorted(heads), results))


# The Hugging Face Hub's `license` of a card, by dataset: the training data's terms govern the weights; 'other'
# where they are not an SPDX licence (then `license_name` and the card's Licences section say which)
HUB_LICENCES = {
    "mimic_cxr": ("other", "physionet-credentialed-health-data-1.5.0"),
    "covid_notes": ("other", "per-image-licences"),
}
HUB_METRICS = {
    "checkpoints": "roc_auc",
    "segmentation": "dice",
    "detection": "map",
    "retrieval": "recall",
    "zero_shot": "roc_auc",
}  # results.json key -> the metric its rows report


def hub_metadata(encoder: Encoder, results: str) -> str:
    """The card's YAML block the Hugging Face Hub reads: licence, library, pipeline, tags, datasets, metrics. The
    encoder is trained from scratch (the frozen LLM only produced its targets), so no base_model is named."""
    c = encoder.config
    dataset = c.data.dataset.split(":")[0]
    licence, licence_name = HUB_LICENCES.get(dataset, ("other", "see-the-training-data-licence"))
    tags = ["mvlp_jax", "jax", "medical-imaging", "vision-language-pretraining", c.model.encoder, *sorted(c.objectives)]
    metrics = sorted({HUB_METRICS[kind] for kind in _rows_of(encoder, results)[0]})
    quoted = lambda values: "[" + ", ".join(json.dumps(v) for v in values) + "]"
    lines = [
        "---",
        f"license: {licence}",
        f"license_name: {licence_name}",
        f"library_name: {'transformers' if c.model.encoder == 'vit' else 'mvlp_jax'}",
        "pipeline_tag: image-feature-extraction",
        f"tags: {quoted(tags)}",
        f"datasets: {quoted([dataset])}",
    ]
    if metrics:
        lines.append(f"metrics: {quoted(metrics)}")
    return "\n".join(lines + ["---", ""])


def model_card(encoder: Encoder, kind: str, heads: list[str], results: str) -> str:
    c = encoder.config
    channels = views.channels(c)
    pixels = "grayscale" if channels == 1 else f"{channels}-channel colour"
    objectives = ", ".join(f"{k} (weight {v})" for k, v in sorted(c.objectives.items()))
    lines = [
        hub_metadata(encoder, results) + f"# {encoder.name}: {c.model.encoder} {c.model.variant} image encoder "
        "(mvlp_jax)",
        "",
        f"Exported from `{encoder.source}` (step {encoder.step}).",
        "",
        "## Training",
        "",
        f"- Data: `{c.data.dataset}` split `{c.data.train_split}`, {c.model.image_size} px {pixels} crops, "
        f"normalised as (pixel / 255 - {c.data.mean}) / {c.data.std} in every channel.",
        f"- Objectives: {objectives}; schedule `{c.task_schedule}`; {c.total_steps} steps of "
        f"{c.data.batch_size} images.",
        "- The full config: `training_config.json`.",
        "",
        "## Files",
        "",
    ]
    if c.model.encoder == "vit":
        lines += [
            f"- `model.safetensors`, `config.json`: a transformers `{kind}` ({channels} input channel"
            f"{'s' if channels > 1 else ''}), equal to the "
            "JAX encoder's tokens (tested to 1e-4). Load with `from_pretrained(this_dir)`.",
            "- `preprocessor_config.json`: resize to the trained size and the run's normalisation. mvlp_jax "
            "evaluates on the centred square of an image, resized: crop first for the same features.",
            *(
                [
                    "- ViTMAEModel shuffles its tokens by the `noise` it is given (mask ratio 0 keeps them all): "
                    "pass `noise=torch.arange(num_patches).expand(batch, -1)` for tokens in image order; the CLS "
                    "token and the mean are the same either way."
                ]
                if kind == "ViTMAEModel"
                else []
            ),
        ]
    else:
        lines += [
            "- `encoder.safetensors`: the windowed ViTDet's weights under their Flax parameter paths, and "
            "`config.json` the run's config. There is no transformers class for it and no PyTorch module "
            "is exported: load it with mvlp_jax (`models/vitdet.py`)."
        ]
    if heads:
        lines += [
            f"- `heads.safetensors`: the trained heads ({', '.join(heads)}) under their Flax parameter "
            "paths joined by `/` (dense kernels are (in, out); `pool/map/...` is the attention pooling "
            "that the LLM-target objectives read)."
        ]
    lines += ["", "## Evaluation", ""]
    lines += _evaluation_rows(encoder, results) or ["No evaluation results were given (`--results`)."]
    licence = KNOWN_LICENCES.get(
        c.data.dataset.split(":")[0], f"The licence of `{c.data.dataset}` governs the use of these weights."
    )
    lines += ["", "## Licences", "", f"- Training data: {licence}", "- Code: mvlp_jax, Apache-2.0.", ""]
    return "\n".join(lines)


def _rows_of(encoder: Encoder, results: str) -> tuple[dict[str, list[dict]], list[str]]:
    """({results.json key: its rows that belong to this checkpoint}, the notes) of an evaluation binary's
    results.json, whichever evaluator wrote it (probes, fine-tuning, segmentation, detection, retrieval,
    zero-shot); nothing without `results`."""
    if not results:
        return {}, []
    written = storage.read_json(results)
    mine = lambda r: encoder.source in (r.get("workdir"), f"{storage.canonical(r['workdir'])}/checkpoints/{r['step']}")
    rows = {kind: [r for r in written.get(kind, []) if mine(r)] for kind in ROW_LINES}
    return {kind: found for kind, found in rows.items() if found}, written.get("notes", [])


def _evaluation_rows(encoder: Encoder, results: str) -> list[str]:
    """The card's lines for this checkpoint's evaluation rows, and the notes they carry."""
    rows, notes = _rows_of(encoder, results)
    lines = [ROW_LINES[kind](r) for kind, found in rows.items() for r in found]
    return lines + [f"- Note: {note}" for note in notes] if lines else []


def _interval(value: float, ci: list | None) -> str:
    return f"{value:.4f}" + (f" [95% CI {ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


ROW_LINES = {  # results.json key -> the card's line for one of its rows
    "checkpoints": lambda r: (
        f"- {r['mode']} probe, {r['label_fraction']:.0%} of the labels ({r['train_cases']} "
        f"training cases, {r['test_cases']} test cases): mAUC "
        f"{_interval(r['mauc'], r.get('ci95', {}).get('mauc'))}, exact-match accuracy "
        f"{r['accuracy']:.4f}"
    ),
    **{
        task: (
            lambda r: (
                f"- {r['task']} ({r['head']['kind']}, {r['head']['encoder']} encoder), "
                f"{r['label_fraction']:.0%} of the training images ({r['train_images']}), {r['split']}: "
                + ", ".join(
                    f"{metric} {_interval(r[metric]['mean'], r[metric]['ci95'])}"
                    for metric in ("dice", "dice_nonempty", "map")
                    if metric in r
                )
            )
        )
        for task in ("segmentation", "detection")
    },
    "retrieval": lambda r: (
        f"- retrieval on {r['split']} ({r['images']} images, {r['studies']} studies): image -> "
        f"report R@1 {_interval(r['image_to_report']['R@1'], r['image_to_report']['R@1_ci95'])}, "
        f"report -> image R@1 "
        f"{_interval(r['report_to_image']['R@1'], r['report_to_image']['R@1_ci95'])}"
    ),
    "zero_shot": lambda r: (
        f"- zero-shot ({r['prompts']} prompts) on {r['split']} ({r['test_cases']} cases): mAUC "
        f"{_interval(r['mauc'], r['ci95']['mauc'])}"
    ),
}


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Pretraining workdir.")
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the newest).")
    flags.DEFINE_string("output_dir", None, "Where the export goes.")
    flags.DEFINE_string("results", "", "An evaluation results.json whose rows for this checkpoint go on the card.")
    flags.DEFINE_bool("teacher", False, "Export a DINO run's EMA teacher encoder instead of the student.")
    flags.DEFINE_bool("overwrite", False, "Write into a folder holding other files (same-named ones are replaced).")
    flags.mark_flags_as_required(["workdir", "output_dir"])


def main(argv: list[str]) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    cli.require_extra("export", "exporting to Hugging Face")  # before a checkpoint is read
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    storage.check_writable_dir(f.output_dir, "--output_dir")
    check_output_dir(f.output_dir, f.workdir, f.overwrite)
    encoder = encoder_lib.load(f.workdir, f.step, mesh, teacher=f.teacher, step_flag="--step")
    path = export(encoder, f.output_dir, f.results, workdir=f.workdir)
    print(f"exported {encoder.source} to {f.output_dir} (model card {path})")
    return 0


def run_binary() -> None:
    """`python -m mvlp_jax.export`."""
    define_flags()
    cli.run("mvlp_jax.export", main)
