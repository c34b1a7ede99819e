"""Masks and boxes through the dataset builder: they stay aligned with the image through the resize, bad ones
are skipped and counted, and real lung masks build."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import built
from data_prep import records as R
from data_prep.build_dataset import build
from tests.conftest import SHARED_DATA


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_a_square_and_its_box_survive_a_resize_exactly(tmp_path):
    root = tmp_path / "raw"
    (root / "masks").mkdir(parents=True)
    image = np.full((384, 512), 40, np.uint8)  # height 384, width 512
    image[128:256, 64:192] = 220
    Image.fromarray(image).save(root / "a.png")
    Image.fromarray(np.where(image > 100, 255, 0).astype(np.uint8)).save(root / "masks" / "a.png")
    Image.fromarray(image).save(root / "b.png")
    Image.fromarray(np.zeros((384, 512), np.uint8)).save(root / "masks" / "b.png")
    (root / "manifest.csv").write_text("image,mask,split\na.png,a.png,train\nb.png,b.png,train\n")
    (root / "boxes.csv").write_text("image,label,x,y,w,h\na.png,square,64,128,128,128\na.png,strip,0,0,512,8\n")
    report = build("csv", str(root), str(tmp_path / "out"), name="squares", image_size=192, split_column="split",
                   mask_column="mask", mask_dir="masks", boxes_csv="boxes.csv")
    assert report["annotations"] == ["mask", "boxes"] and report["records_written"] == {"train": 2}
    builder, _, _ = built.open_builder(str(tmp_path / "out"), "squares")
    assert list(builder.info.metadata["annotations"]) == ["mask", "boxes"]
    source = built.open_split(builder, "train")
    a, b = sorted((source[i] for i in range(2)), key=lambda r: r["image_id"])
    pixels, mask = _decode(a["image"]), _decode(a["mask"])
    assert pixels.shape == mask.shape[:2] == (192, 256)
    want = np.zeros((192, 256), np.uint8)
    want[64:128, 32:96] = 1  # the square, halved
    np.testing.assert_array_equal(mask.reshape(192, 256), want)
    assert np.all(pixels[64:128, 32:96] > 200) and np.all(pixels[:60] < 60)
    np.testing.assert_array_equal(a["boxes"], [[32, 64, 96, 128], [0, 0, 256, 4]])
    assert [x.decode() for x in a["box_labels"]] == ["square", "strip"]
    assert b["boxes"].shape == (0, 4) and _decode(b["mask"]).max() == 0


def test_masks_of_another_size_missing_masks_and_boxes_outside_the_image_are_skipped_by_name(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for name in "abcd":
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / f"{name}.png")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "ok.png")
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(root / "small.png")
    (root / "manifest.csv").write_text("image,mask,split\na.png,ok.png,train\nb.png,small.png,train\n"
                                       "c.png,gone.png,train\nd.png,ok.png,train\n")
    (root / "boxes.csv").write_text("image,label,x,y,w,h\nd.png,x,40,0,20,10\nzz.png,x,0,0,1,1\n")
    report = build("csv", str(root), str(tmp_path / "out"), name="bad", image_size=0, mask_column="mask",
                   boxes_csv="boxes.csv", split_column="split")
    assert report["records_written_total"] == 1
    skipped = report["skipped"]
    assert skipped[R.MASK_UNREADABLE]["count"] == 1 and "mask is 48x30 px" in skipped[R.MASK_UNREADABLE]["examples"][0]
    assert skipped[R.MASK_MISSING]["count"] == 1 and "gone.png" in skipped[R.MASK_MISSING]["examples"][0]
    assert skipped[R.BAD_BOX]["count"] == 1 and "outside the 48x32 px image" in skipped[R.BAD_BOX]["examples"][0]
    assert any("zz.png" in note for note in report["notes"])
    (root / "manifest.csv").write_text("image,mask,split\na.png,ok.png,train\nb.png,small.png,test\n")
    with pytest.raises(R.InputError, match="every record of that split was skipped"):
        build("csv", str(root), str(tmp_path / "out2"), name="bad", image_size=0, mask_column="mask",
              split_column="split")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "covid_lung_masks")), reason="shared data absent")
def test_real_lung_masks_build_binary_and_aligned(tmp_path):
    root = os.path.join(SHARED_DATA, "covid_lung_masks")
    report = build("csv", root, str(tmp_path), name="lungs", manifest="metadata.csv", image_column="filename",
                   image_dir="images", mask_column="mask", mask_dir="masks", group_column="patientid",
                   view_column="view", views="all", image_size=128, num_workers=2)
    assert report["records_written_total"] == 210 and report["skipped_total"] == 0
    source = built.open_split(built.open_builder(str(tmp_path), "lungs")[0], "train")
    fractions = []
    for i in range(len(source)):
        r = source[i]
        image, mask = _decode(r["image"]), _decode(r["mask"])
        assert mask.shape[:2] == image.shape and set(np.unique(mask)) <= {0, 1}
        fractions.append(mask.mean())
    assert 0.1 < np.median(fractions) < 0.5  # lungs cover a fair part of a chest X-ray


def test_dice_per_image_matches_a_hand_computation_including_empty_masks():
    from mvlp_jax.dense_metrics import dice_per_image

    truth = np.zeros((4, 4, 4), bool)
    predicted = np.zeros((4, 4, 4), bool)
    truth[0, :2, :2] = True            # 4 true pixels
    predicted[0, :2, :3] = True        # 6 predicted, 4 overlapping: 2 * 4 / (4 + 6) = 0.8
    truth[1, 0, 0] = True              # a missed finding: 0
    predicted[2, 3, 3] = True          # a false alarm on an empty image: 0
    np.testing.assert_allclose(dice_per_image(predicted, truth), [0.8, 0.0, 0.0, 1.0])  # empty / empty: 1


def test_paired_difference_uses_the_same_patient_resamples():
    from mvlp_jax import metrics
    from mvlp_jax.dense_metrics import paired_difference

    rng = np.random.default_rng(0)
    a, b, groups = rng.uniform(size=30), rng.uniform(size=30), np.repeat(np.arange(10), 3)
    out = paired_difference(a, b + 0.1, groups, 200, 3)
    diffs = [np.mean(b[d] + 0.1 - a[d]) for d in metrics.bootstrap_indices(groups, 200, 3)]
    np.testing.assert_allclose(out["difference"], np.mean(b + 0.1 - a))
    np.testing.assert_allclose(out["interval"], np.quantile(diffs, [0.025, 0.975]))
    np.testing.assert_allclose(out["p_not_better"], np.mean(np.asarray(diffs) <= 0))


@pytest.mark.parametrize("patch", [8, 16])
def test_progressive_upsampling_returns_logits_at_the_input_resolution(patch):
    import jax
    import jax.numpy as jnp

    from mvlp_jax.models.dense_heads import ProgressiveUpsampling

    head = ProgressiveUpsampling(patch_size=patch, channels=(8, 4))
    tokens = jnp.ones((2, 3, 5, 12))
    variables = head.init(jax.random.PRNGKey(0), tokens)
    assert head.apply(variables, tokens).shape == (2, 3 * patch, 5 * patch, 1)
    with pytest.raises(ValueError, match="patch size 14 is not a power of 2"):
        ProgressiveUpsampling(patch_size=14).init(jax.random.PRNGKey(0), tokens)


def test_a_head_on_a_frozen_encoder_learns_real_lung_masks(nih_and_workdir, tmp_path):
    """The evaluation binary on the shipped lung masks: the head's Dice beats the empty-mask predictor's
    (0 on every image with lungs) by far, the paired comparison and the picture are written."""
    import json

    from configs import segmentation
    from mvlp_jax import evaluate
    from mvlp_jax.demo import DATASETS

    _, workdir = nih_and_workdir
    options = dict(DATASETS["covid_lungs"], image_size=64)
    build("csv", options.pop("input_dir"), str(tmp_path / "tfds"), name="covid_lungs", **options)
    c = segmentation.get_config("demo")
    c.data_dir, c.workdirs, c.bootstrap = str(tmp_path / "tfds"), f"{workdir},random_init", 100
    c.label_fractions, c.segmentation.epochs, c.segmentation.channels = (1.0,), 8, (16, 8)
    results = evaluate.evaluate(c, str(tmp_path / "out"))
    for row in results["segmentation"]:
        assert row["dice"]["mean"] > 0.5, row  # the empty mask scores 0 on every test image (all show lungs)
        assert row["head"]["epoch"] >= 1 and np.isfinite(row["head"]["val_loss"])
    comparison, = results["comparisons"]
    assert comparison["candidate"] == "random_init" and comparison["label_fraction"] == 1.0
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["segmentation"][0]["dice"] == results["segmentation"][0]["dice"]
    assert "SETR-PUP, frozen encoder" in open(tmp_path / "out" / "results.md").read()
    assert os.path.getsize(tmp_path / "out" / "segmentation.png") > 10_000
