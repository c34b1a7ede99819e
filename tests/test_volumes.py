"""3D volumes: tubelets and 3D positions reduce to the 2D path for one slice, a one-slice volume through ViT3D is
the 2D ViT, MAE in 3D overfits a single volume, the pipeline cuts consecutive slices of a series with one 3D
crop and trains on the 8-device mesh, and the train step compiles for a TPU slice."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from mvlp_jax import configuration
from mvlp_jax.kernels import patchify
from mvlp_jax.models.transformer import sincos_2d
from mvlp_jax.models.vit import ViT
from mvlp_jax.models.vit3d import MAE3D, ViT3D, sincos_3d, tubelets
from mvlp_jax.tools.demo import load_config

MICRO = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8)


def test_one_slice_tubelets_and_positions_are_the_2d_ones():
    volume = np.random.default_rng(0).normal(size=(2, 3, 32, 32, 1)).astype(np.float32)
    per_slice = np.concatenate([patchify(jnp.asarray(volume[:, z]), 8) for z in range(3)], axis=1)
    np.testing.assert_array_equal(tubelets(jnp.asarray(volume), 1, 8), per_slice)
    np.testing.assert_allclose(sincos_3d(1, 4, 4, 64), sincos_2d(4, 4, 64), atol=1e-7)
    depth = sincos_3d(3, 4, 4, 64).reshape(3, 16, 64)
    assert np.abs(depth[1] - depth[0]).max() > 0.1 and np.abs(depth[2] - depth[1]).max() > 0.1  # depth is seen
    with pytest.raises(ValueError, match="not divisible into tubelets of 2x8x8"):
        tubelets(jnp.asarray(volume), 2, 8)


def test_a_one_slice_volume_is_the_2d_vit_with_the_same_parameters():
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
    vit, vit3d = ViT(**MICRO, attention="xla"), ViT3D(**MICRO, tubelet=1, attention="xla")
    params = nn.unbox(vit.init(jax.random.PRNGKey(0), images)["params"])
    conv = params["embedding"]["conv"]
    mapped = {
        "embedding": {"kernel": conv["kernel"].reshape(-1, MICRO["width"]), "bias": conv["bias"]},
        "cls": params["cls"],
        "encoder": params["encoder"],
    }
    own = nn.unbox(vit3d.init(jax.random.PRNGKey(0), images[:, None])["params"])
    assert jax.tree.structure(own) == jax.tree.structure(mapped)  # the same parameters, the patch kernel reshaped
    np.testing.assert_allclose(
        vit3d.apply({"params": mapped}, images[:, None]), vit.apply({"params": params}, images), rtol=1e-5, atol=1e-5
    )


def test_mae_in_3d_overfits_a_single_volume():
    z, y, x = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    volume = (np.exp(-4 * (x**2 + y**2 + z**2)) + 0.3 * np.sin(3 * x + 2 * z))[None, ..., None].astype(np.float32)
    model = MAE3D(encoder=ViT3D(**MICRO, tubelet=2), decoder_width=64, decoder_depth=1, decoder_heads=2,
                  decoder_mlp_dim=128, mask_ratio=0.5)  # fmt: skip
    key = jax.random.PRNGKey(0)
    params = model.init({"params": key, "masking": key}, volume)["params"]
    tx = optax.adam(2e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, k):
        loss, grads = jax.value_and_grad(lambda p: model.apply({"params": p}, volume, rngs={"masking": k})["loss"])(
            params
        )
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(150):
        params, state, loss = step(params, state, jax.random.fold_in(key, i))
        losses.append(float(loss))
    out = model.apply({"params": params}, volume, rngs={"masking": key})
    assert out["pred"].shape == (1, 4 * 4 * 4, 2 * 8 * 8) and out["grid"] == (4, 4, 4)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def _series(root: str, patients: int = 3, slices: int = 12, size: int = 32, splits: tuple = ()) -> None:
    """CT-like series: slice z of patient p holds a disc whose radius grows with z (so order is visible), a
    "tumour" from slice 3 on (its mask); the file names are in another order (only z_mm gives the slices')."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = ["image,patient_id,split,z_mm,mask"]
    yy, xx = np.mgrid[:size, :size] - size / 2
    scrambled = np.random.default_rng(0).permutation(slices)
    for p in range(patients):
        for z in range(slices):
            disc = np.hypot(yy, xx) < 2 + z
            name = f"images/p{p}_s{scrambled[z]:03d}.png"
            Image.fromarray(disc.astype(np.uint8) * (100 + 40 * p)).save(os.path.join(root, name))
            mask = Image.fromarray(disc.astype(np.uint8) * 255 * (z >= 3))
            mask.save(os.path.join(root, name.replace(".png", "_mask.png")))
            split = splits[p] if splits else "train"
            rows.append(f"{name},p{p},{split},{-880.0 + 3.27 * z:.2f},{name.replace('.png', '_mask.png')}")
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def _volume_config(data_dir: str, **overrides):
    config = load_config("mae", "demo,volume")
    config.data.data_dir, config.data.dataset = data_dir, "series"
    config.model.variant, config.model.image_size, config.model.volume_depth = "mu/8", 32, 4
    config.model.decoder_width, config.model.decoder_depth, config.model.decoder_heads = 32, 1, 2
    config.data.batch_size, config.total_steps, config.log_images_every_steps = 8, 6, 0
    config.checkpoint.save_interval_steps, config.optim.warmup_steps, config.log_every_steps = 6, 1, 1
    config.data.crop_scale = (1.0, 1.0)
    return configuration.override(config, overrides)


def test_volumes_are_consecutive_slices_with_one_crop_and_train_on_the_mesh(tmp_path):
    from data_prep.build_dataset import build
    from mvlp_jax.data import pipeline
    from mvlp_jax.pretrain import train

    _series(str(tmp_path / "raw"))
    build("csv", str(tmp_path / "raw"), str(tmp_path / "tfds"), name="series", split_column="split",
          group_column="patient_id", study_column="patient_id", slice_position_column="z_mm",
          image_size=0)  # fmt: skip
    config = _volume_config(str(tmp_path / "tfds"))
    configuration.validate(config)
    records = pipeline.open_records(config)
    assert records.volumes and records.indices.shape == (3, 12)
    preprocess = pipeline.Preprocess(records, config, 8)
    example = preprocess.random_map((0, 0), np.random.default_rng(0))
    volume = example["image"]
    assert volume.shape == (4, 32, 32, 1)
    bright = (volume[..., 0] > volume.min() + 1e-3).sum(axis=(1, 2))
    assert np.all(np.diff(bright) > 0)  # consecutive slices in z order (not file-name order): the disc grows
    train.train(config, str(tmp_path / "run"))  # on the 8-device mesh (data.batch_size 8)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 6 and all(np.isfinite(r["mae/loss"]) for r in rows)
    assert all("volumes_per_s" in r and "images_per_s" not in r for r in rows)  # a batch counts volumes
    config.model.volume_depth = 16
    with pytest.raises(ValueError, match="no series of model.volume_depth=16 slices"):
        pipeline.open_records(config)


def test_slices_are_ordered_by_position_then_image_id_and_a_bad_position_is_refused(tmp_path):
    from data_prep.sources import csv_manifest
    from mvlp_jax.data import records as R
    from mvlp_jax.data import studies

    record = lambda image, **extra: {"image_id": image.encode(), **extra}
    keys = [studies.slice_key(record(i, slice_position=np.float32(z))) for i, z in (("a", 2.5), ("b", -1.0))]
    assert keys == [(2.5, "a"), (-1.0, "b")]
    indices, short = studies.volumes(["s", "s", "t"], keys + [studies.slice_key(record("c"))], depth=2)
    assert indices.tolist() == [[1, 0]] and short == 1  # b (z -1) before a; series t is too short
    without = [studies.slice_key(record(i)) for i in ("z2", "z1")]
    assert studies.volumes(["s", "s"], without, depth=2)[0].tolist() == [[1, 0]]  # no positions: by image id
    _series(str(tmp_path), patients=1, slices=2)
    for bad in ("above", "nan"):  # a NaN would sort nowhere and scramble its series
        with open(tmp_path / "manifest.csv", "a") as f:
            f.write(f"images/p0_s000.png,p0,train,{bad}\n")
        with pytest.raises(R.InputError, match=f"z_mm='{bad}' is not a finite number"):
            csv_manifest.scan(str(tmp_path), split_column="split", slice_position_column="z_mm")
        lines = open(tmp_path / "manifest.csv").read().splitlines()[:-1]
        open(tmp_path / "manifest.csv", "w").write("\n".join(lines) + "\n")


def test_volume_config_refusals():
    config = _volume_config("")
    config.model.volume_depth = 5
    with pytest.raises(ValueError, match="volume_depth=5 must be a multiple of model.tubelet=2"):
        configuration.validate(config)
    config.model.volume_depth, config.objectives = 4, {"mae": 1.0, "dino": 1.0}
    with pytest.raises(ValueError, match="vit3d trains with objectives"):
        configuration.validate(config)


def test_the_3d_train_step_compiles_for_a_tpu_slice():
    pytest.importorskip("libtpu")
    from mvlp_jax.pretrain import aot

    config = _volume_config("", **{"mesh.data": 2, "mesh.fsdp": 2, "model.image_size": 64, "model.volume_depth": 8})
    (report,) = aot.compile_programs(config, "v4-8", target_dim=0, programs=("train",))
    assert report.fits and report.chips == 4 and report.flops > 0
    assert "volumes/s per chip" in "\n".join(report.lines()) and report.summary()["examples"] == "volumes"
    assert report.collectives["all-gather"]["count"] > 0  # fsdp gathers the sharded parameters


def test_windows_cover_a_series_and_stitch_back_averaging_overlaps():
    from mvlp_jax.evaluation.dense.volume_segmentation import stitch, window_starts

    assert (
        window_starts(12, 4, 3) == [0, 3, 6, 8]
        and window_starts(12, 4, 4) == [0, 4, 8]
        and window_starts(4, 4, 2) == [0]
    )
    series = np.arange(12, dtype=np.float64)[:, None] * np.ones((1, 2))
    starts = np.array(window_starts(12, 4, 3))
    windows = np.stack([series[s : s + 4] for s in starts])
    np.testing.assert_array_equal(stitch(windows, starts), series)
    windows[1] += 3.0  # slices 3-6; slice 3 is also in window 0, 6 in window 2: their mean moves by 1.5
    moved = stitch(windows, starts) - series
    np.testing.assert_allclose(moved[:, 0], [0, 0, 0, 1.5, 3, 3, 1.5, 0, 0, 0, 0, 0])


def test_the_plane_head_gives_each_plane_its_tubelets_slices():
    from mvlp_jax.models.dense_heads import PlaneUpsampling, ProgressiveUpsampling

    tokens = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 2, 2, 16)), jnp.float32)
    head = PlaneUpsampling(depth=6, patch_size=4, channels=(8, 8))
    variables = head.init(jax.random.PRNGKey(0), tokens)
    out = head.apply(variables, tokens)
    assert out.shape == (2, 6, 8, 8, 1)
    plane = ProgressiveUpsampling(patch_size=4, channels=(8, 8), classes=2)
    inner = {collection: tree["planes"] for collection, tree in variables.items()}
    for k in range(3):  # plane k's two output channels are slices 2k and 2k + 1
        np.testing.assert_allclose(
            out[:, 2 * k : 2 * k + 2, ..., 0],
            plane.apply(inner, tokens[:, k]).transpose(0, 3, 1, 2),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="3 token planes do not divide a volume of 4 slices"):
        PlaneUpsampling(depth=4, patch_size=4, channels=(8,)).init(jax.random.PRNGKey(0), tokens)


def test_volume_scores_are_whole_series_counted_once_whatever_their_windows():
    from mvlp_jax.evaluation.dense.volume_segmentation import TASK, window_starts

    rng = np.random.default_rng(3)
    masks = rng.random((3, 10, 4, 4)) < 0.3  # series of 10, 10 and 3 slices; series 1 has no mask on slices 0-4
    masks[1, :5] = False
    lengths = (10, 10, 3)
    padded = masks.copy()
    padded[2, 3:] = masks[2, 2]  # the short series' window repeats its last slice
    starts = {0: window_starts(10, 4, 2), 1: window_starts(10, 4, 4), 2: [0]}  # 4 windows, 3 and 1
    of_series = np.array([s for s in (0, 1, 2) for _ in starts[s]])
    start = np.array(starts[0] + starts[1] + starts[2])
    cut = lambda volumes: np.stack([volumes[s, b : b + 4] for s, b in zip(of_series, start)])
    truth = {
        "targets": {"mask": cut(padded)},
        "series": of_series,
        "starts": start,
        "lengths": np.array([lengths[s] for s in of_series]),
    }
    guess = padded.copy()
    guess[0, 2] = ~guess[0, 2]  # one slice of series 0 wrong
    guess[2, 3:] = True  # the short series' padding predicted full: not scored
    scores, predicted = TASK.score(np.where(cut(guess), 4.0, -4.0)[..., None], truth, 4, {})
    dice = lambda p, t: 2 * (p & t).sum() / (p.sum() + t.sum())
    expected = [dice(guess[0], masks[0]), 1.0, 1.0]
    assert scores["dice"](np.arange(8)) == pytest.approx(np.mean(expected))  # each series once, not per window
    assert scores["dice"](np.array([4, 5, 6])) == pytest.approx(1.0)
    assert scores["dice"](np.array([0, 1, 2, 3, 7])) == pytest.approx((expected[0] + 1.0) / 2)  # whole series drawn
    per_slice = [dice(guess[s, z], masks[s, z]) for s in range(3) for z in range(lengths[s]) if masks[s, z].any()]
    assert scores["dice_slices"](np.arange(8)) == pytest.approx(np.mean(per_slice))  # pooled over slices
    np.testing.assert_array_equal(predicted[1], guess[0, 2:6])
    np.testing.assert_array_equal(predicted[7, :3], masks[2, :3])
    assert not predicted[7, 3:].any()  # the padding is no prediction
    assert (
        TASK.cases({**truth, "patients": np.array(["a"] * 4 + ["b"] * 3 + ["c"])}).tolist()
        == ["a"] * 10 + ["b"] * 10 + ["c"] * 3
    )


def test_a_head_on_a_frozen_3d_encoder_segments_the_held_out_series(tmp_path):
    """Train on one series, stop early on another, score the third whole: the evaluation binary end to end on a
    2-step MAE3D checkpoint; a 2D evaluator refuses the volume encoder by name."""
    from configs import segmentation
    from data_prep.build_dataset import build
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.pretrain import train

    _series(str(tmp_path / "raw"), splits=("train", "validate", "test"))
    build("csv", str(tmp_path / "raw"), str(tmp_path / "tfds"), name="series", split_column="split",
          group_column="patient_id", study_column="patient_id", slice_position_column="z_mm", mask_column="mask",
          image_size=0)  # fmt: skip
    config = _volume_config(str(tmp_path / "tfds"), total_steps=2, **{"checkpoint.save_interval_steps": 2})
    config.data.train_split = "train"
    train.train(config, str(tmp_path / "run"))
    c = segmentation.get_config("volume")
    c.data_dir, c.dataset, c.workdirs = str(tmp_path / "tfds"), "series", str(tmp_path / "run")
    c.volume_segmentation.depth, c.volume_segmentation.stride = 4, 3
    c.volume_segmentation.channels, c.volume_segmentation.epochs, c.volume_segmentation.lr = (16, 8), 40, 2e-3
    results = evaluate.evaluate(c, str(tmp_path / "out"))
    (row,) = results["volume_segmentation"]
    assert row["test_images"] == 4 and row["train_patients"] == 1  # windows 0, 3, 6, 8 of the test series
    assert row["dice"]["mean"] > 0.6 and row["dice_slices"]["mean"] > 0.4, row
    assert "Dice per volume" in open(tmp_path / "out" / "results.md").read()
    assert os.path.getsize(tmp_path / "out" / "volume_segmentation.png") > 5_000
    c.evaluator = "segmentation"
    with pytest.raises(ValueError, match="encodes volumes .* use evaluator='volume_segmentation'"):
        evaluate.evaluate(c, str(tmp_path / "out2"))
