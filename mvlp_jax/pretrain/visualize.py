"""Pictures of what a pretraining run has learned, for a person to look at:

  python -m mvlp_jax.visualize --workdir=runs/demo/pretrain [--step=-1] [--split=validate] [--images=8]

and during training every `log_images_every_steps` (0: off). Each picture goes to WORKDIR/plots/{name}_{step}.png
and to TensorBoard (`images/{name}`):
- reconstruction (runs with the mae objective): masked input | the masked-image model's prediction (visible
  patches pasted from the input) | original (MAE on a ViT, SimMIM on a ViTDet);
- attention: where the image embedding looks (the MAP pooling where LLM targets trained one, else the CLS token
  on a ViT or the mean token on a ViTDet, which DINO and the query-box head read): the MAP's and the CLS token's
  last-block attention, averaged over heads, and each patch token's cosine similarity to the embedding, overlaid;
- each objective's own (its Spec's `pictures`), e.g. query_box: a random region of each image (below it), its true
  box red, predicted blue;
- nearest_reports (runs with an image-report space): each image's three nearest reports among the shown studies,
  by study id, its own marked. Never report text: it is patient data.
The images are the first `images` of a split (validate when the dataset has one), centre-cropped as evaluation sees
them, so pictures of successive steps show the same images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.data import built, transforms
from mvlp_jax.data import targets as targets_lib
from mvlp_jax.data import views as views_lib
from mvlp_jax.data.studies import view_type
from mvlp_jax.evaluation import shared_space
from mvlp_jax.models.norm import l2_normalise
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.models.vit import patchify, unpatchify, variant
from mvlp_jax.objectives import registry
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import cli, figures, sharding, storage

POOLING_LABELS = {"map": "MAP", "cls": "CLS", "mean": "mean-token"}


@dataclass
class Shown:
    """The images pictures are drawn on: normalised (N, S, S, C), as uint8 for display, their study ids,
    where the run has LLM targets their studies' stored vectors (N, D), and their vit.VIEW_TYPES (N,) (a study
    encoder reads a lateral view with its view type; None: all frontal)."""

    images: np.ndarray
    pixels: np.ndarray
    study_ids: list[str]
    targets: np.ndarray | None = None
    view_types: np.ndarray | None = None


def pick_split(builder: Any, requested: str, train_split: str) -> str:
    if requested:
        if requested not in builder.info.splits:
            raise ValueError(f"split {requested!r} is not in the dataset (it has {', '.join(builder.info.splits)})")
        return requested
    return "validate" if "validate" in builder.info.splits else train_split


def shown_images(config: ml_collections.ConfigDict, count: int, split: str = "", table: Any = None) -> Shown:
    """The first `count` images of `split` of the run's dataset, and their targets from `table` (a
    data.targets.TargetTable) when given."""
    builder, name, version = built.open_builder(config.data.data_dir, config.data.dataset)
    split = pick_split(builder, split, config.data.train_split)
    source = built.open_split(builder, split)
    records = [source[i] for i in range(min(count, len(source)))]
    if not records:
        raise ValueError(f"{name}:{version}/{split} has no images to draw")
    size, channels = config.model.image_size, views_lib.channels(config)
    pixels = np.stack(
        [transforms.center_crop_resize(transforms.decode_png(r["image"], channels), size) for r in records]
    )
    study_ids = [r["study_id"].decode() for r in records]
    vectors = None
    if table is not None:
        rows = targets_lib.join(study_ids, table, True, f"{name}:{version}/{split}")
        vectors = np.where(rows[:, None] >= 0, table.vectors[np.maximum(rows, 0)], np.nan).astype(np.float32)
    view_types = np.array([view_type(r["view"].decode()) for r in records], np.int32)
    return Shown(
        transforms.normalise(pixels, config.data.mean, config.data.std, channels),
        pixels,
        study_ids,
        vectors,
        view_types,
    )


class Painter:
    """Draws a run's pictures from its params; built once per run (the model and jitted functions are reused)."""

    def __init__(self, config: ml_collections.ConfigDict, target_dim: int, seed: int = 0):
        self.config, self.seed = config, seed
        self.model = Pretrainer(config, target_dim, sow_attention=True)
        model = self.model
        self._masked = jax.jit(
            lambda p, x, noise: model.apply(
                {"params": p}, x, method=lambda m, x: m.masked_model(x, noise=noise, train=False)
            )
        )
        pooling = pooling_name(config, self.model)
        self._attention = jax.jit(
            lambda p, x, t: model.apply(
                {"params": p}, x, pooling, False, t, method=Pretrainer.features, mutable=["intermediates"]
            )
        )
        self._tokens = jax.jit(lambda p, x, t: model.apply({"params": p}, x, False, t, method=Pretrainer.patch_grid))
        self._jitted: dict[str, Any] = {}

    def jitted(self, key: str, fn: Any) -> Any:
        """`jax.jit(fn)`, made once per painter under `key` (an objective's picture reuses it at every step)."""
        if key not in self._jitted:
            self._jitted[key] = jax.jit(fn)
        return self._jitted[key]

    def draw(self, params: Any, shown: Shown) -> dict[str, np.ndarray]:
        """{picture name: RGB uint8 array} of the pictures this run has."""
        pictures = {"attention": self.attention(params, shown)}
        if "masked_model" in params:  # trained by mae (or not initialised: M-FLAG alone has no decoder)
            pictures["reconstruction"] = self.reconstruction(params, shown)
        for spec in registry.configured(self.config):  # each objective's own pictures
            if spec.pictures is not None:
                pictures.update(spec.pictures(self, params, shown))
        if shown.targets is not None and self.model.target_dim and _has_space(self.config):
            pictures["nearest_reports"] = self.nearest_reports(params, shown)
        return {k: v for k, v in pictures.items() if v is not None}

    def reconstruction(self, params: Any, shown: Shown) -> np.ndarray:
        p = _patch(self.config)
        n, size = len(shown.images), shown.images.shape[1]
        grid = (size // p, size // p)
        noise = jax.random.uniform(jax.random.PRNGKey(self.seed), (n, grid[0] * grid[1]))
        out = self._masked(params, jnp.asarray(shown.images), noise)
        mask = np.asarray(out["mask"]) > 0
        predicted = paste(shown.images, np.asarray(out["pred"], np.float32), mask, p, self.config.model.norm_pix_loss)
        hidden = np.kron(mask.reshape(n, *grid), np.ones((1, p, p))).astype(bool)
        display = lambda x: np.clip((x * self.config.data.std + self.config.data.mean) * 255.0, 0, 255).astype(np.uint8)
        rows = [
            [figures.rgb(shown.pixels[i], hidden[i]), figures.rgb(display(predicted[i])), figures.rgb(shown.pixels[i])]
            for i in range(n)
        ]
        m = self.config.model
        return figures.grid_figure(
            rows,
            ["masked input", "prediction", "original"],
            f"{m.encoder} masked-image model, mask ratio {m.mask_ratio}",
        )

    def attention(self, params: Any, shown: Shown) -> np.ndarray:
        images = jnp.asarray(shown.images)
        types = None if shown.view_types is None else jnp.asarray(shown.view_types)
        embedding, state = self._attention(params, images, types)
        tokens = np.asarray(self._tokens(params, images, types))
        grid = tokens.shape[1]
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        maps = {
            "tokens vs embedding (cosine)": np.einsum(
                "bhwd,bd->bhw", unit(tokens), unit(np.asarray(embedding))
            ).reshape(len(tokens), -1)
        }
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
            key = jax.tree_util.keystr(path)
            if "attention_weights" not in key:
                continue
            weights = np.asarray(leaf[0] if isinstance(leaf, tuple) else leaf, np.float32)
            if "pool" in key:  # (B, heads, 1, patches): the MAP probe over the patch tokens
                maps["MAP pooling"] = weights[:, :, 0].mean(1)
            elif weights.shape[-1] == grid * grid + 1:  # global block with CLS; the last one wins
                weights = weights[-1] if weights.ndim == 5 else weights
                maps["CLS, last block"] = weights[:, :, 0, 1:].mean(1)
        rows = [
            [figures.overlay(shown.pixels[i], m[i].reshape(grid, grid)) for m in maps.values()]
            + [figures.rgb(shown.pixels[i])]
            for i in range(len(shown.pixels))
        ]
        pooled = POOLING_LABELS[pooling_name(self.config, self.model)]
        return figures.grid_figure(
            rows,
            list(maps) + ["image"],
            f"where the {pooled} embedding looks: attention (mean over heads) and each patch token's similarity to it",
        )

    def nearest_reports(self, params: Any, shown: Shown) -> np.ndarray | None:
        keep = ~np.isnan(shown.targets).any(axis=1)
        studies = sorted({s for s, k in zip(shown.study_ids, keep) if k})
        if not studies:
            return None
        encoder = encoder_lib.Encoder("shown", self.config, self.model, params, 0, "", "")
        space = shared_space.resolve(encoder)
        vectors = np.stack([shown.targets[shown.study_ids.index(s)] for s in studies])
        images = jnp.asarray(shown.images[keep])
        pooled = self.model.apply({"params": params}, images, train=False, method=space.images)
        embedded = shared_space.image_head_over_set(encoder, space, np.asarray(pooled))
        texts = shared_space.embed_texts(encoder, space, vectors)
        similarity = np.asarray(l2_normalise(jnp.asarray(embedded))) @ np.asarray(l2_normalise(jnp.asarray(texts))).T
        own = np.array([studies.index(s) for s, k in zip(shown.study_ids, keep) if k])
        rows = []
        for pixels, row, mine, (best, rank) in zip(shown.pixels[keep], similarity, own, nearest(similarity, own)):
            lines = [f"{'*' if j == mine else ' '} {studies[j]}  {row[j]:+.2f}" for j in best]
            rows.append(
                [figures.rgb(pixels), figures.text_panel(lines + [f"own report: rank {rank} of {len(studies)}"])]
            )
        return figures.grid_figure(
            rows, ["image", "nearest reports (study id, cosine; * its own)"], "nearest reports among the shown studies"
        )


def paste(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch: int, norm_pix: bool) -> np.ndarray:
    """The masked-image model's picture as MAE's paper draws it: masked patches from the prediction (N, patches,
    patch * patch * C), visible ones from `images` (N, S, S, C). Predictions of per-patch normalised targets
    (norm_pix) are put back in each original patch's mean and standard deviation."""
    n, size = images.shape[:2]
    grid = (size // patch, size // patch)
    original = np.asarray(patchify(jnp.asarray(images), patch))
    if norm_pix:
        mean, var = original.mean(-1, keepdims=True), original.var(-1, keepdims=True, ddof=1)
        pred = pred * np.sqrt(var + 1e-6) + mean
    mixed = np.where(mask[..., None], pred, original)
    return np.asarray(unpatchify(jnp.asarray(mixed), grid, patch, images.shape[-1]))


def nearest(similarity: np.ndarray, own: np.ndarray, k: int = 3) -> list[tuple[np.ndarray, int]]:
    """Per row of similarity (images, reports): the k most similar reports, and the 1-based rank of its own
    report `own[i]` (ties counted against it)."""
    return [(np.argsort(-row, kind="stable")[:k], int((row >= row[mine]).sum())) for row, mine in zip(similarity, own)]


def pooling_name(config: ml_collections.ConfigDict, model: Pretrainer) -> str:
    """The embedding the pictures explain: the MAP pooling where LLM targets trained one, else the global
    pooling DINO and the query-box head read (CLS on a ViT, the mean token on a ViTDet)."""
    if model.target_dim and config.model.pool == "map":
        return "map"
    return "cls" if config.model.encoder == "vit" else "mean"


def _has_space(config: ml_collections.ConfigDict) -> bool:
    return any(spec.shared_space is not None for spec in registry.configured(config))


def _patch(config: ml_collections.ConfigDict) -> int:
    return variant(config.model.variant)["patch_size"]


def save(pictures: dict[str, np.ndarray], workdir: str, step: int, writer: Any = None) -> list[str]:
    """PNGs under WORKDIR/plots/ and, with a clu writer, TensorBoard images; returns the paths."""
    from PIL import Image

    paths = []
    for name, picture in pictures.items():
        path = storage.join(workdir, "plots", f"{name}_{step}.png")
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="png")
        storage.write_bytes(path, buffer.getvalue())
        paths.append(path)
    if writer is not None and pictures:
        writer.write_images(step, {f"images/{k}": v[None] for k, v in pictures.items()})
    return paths


def draw_checkpoint(
    workdir: str, step: int = -1, split: str = "", count: int = 8, data_dir: str = "", dataset: str = ""
) -> list[str]:
    """Draws the pictures of `workdir`'s checkpoint `step` (-1: the newest) into WORKDIR/plots/ and TensorBoard,
    on the run's dataset or on `dataset` in `data_dir` (when the run's data have moved)."""
    from clu import metric_writers

    mesh = sharding.make_mesh(ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "model": 1}}))
    encoder = encoder_lib.load(workdir, step, mesh, step_flag="--step")
    config = ml_collections.ConfigDict(encoder.config.to_dict())
    config.data.data_dir, config.data.dataset = data_dir or config.data.data_dir, dataset or config.data.dataset
    table = None
    if encoder.model.target_dim and config.data.embeddings_dir and storage.path(config.data.embeddings_dir).is_dir():
        table = targets_lib.load_targets(config.data.embeddings_dir, config.contrastive.target)
    shown = shown_images(config, count, split, table)
    with sharding.active(mesh):
        pictures = Painter(config, encoder.model.target_dim).draw(encoder.params, shown)
    spool = storage.Spool(workdir)  # TensorBoard's event file, uploaded whole to a remote workdir
    writer = metric_writers.create_default_writer(spool.local)
    paths = save(pictures, workdir, encoder.step, writer)
    writer.close()
    spool.close()
    return paths


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Pretraining workdir (its config says where its data are).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the newest).")
    flags.DEFINE_string(
        "split", "", "Split whose first images are drawn ('': validate if the dataset has it, else the training split)."
    )
    flags.DEFINE_integer("images", 8, "How many images.")
    flags.DEFINE_string("data_dir", "", "TFDS data dir ('': the run's data.data_dir).")
    flags.DEFINE_string("dataset", "", "Dataset ('': the run's data.dataset).")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    for path in draw_checkpoint(f.workdir, f.step, f.split, f.images, f.data_dir, f.dataset):
        print(path)
    return 0


def run_binary() -> None:
    """`python -m mvlp_jax.visualize`."""
    define_flags()
    cli.run("mvlp_jax.visualize", main)
