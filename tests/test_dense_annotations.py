"""Masks and boxes through the dataset builder: they stay aligned with the image through the resize, every mask
encoding is read as meant (or refused naming --mask_values), bad boxes are fixed and counted, bad masks skipped and
counted, and real lung masks build; then the dense heads on them."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from data_prep.build_dataset import build
from mvlp_jax.data import built
from mvlp_jax.data import records as R
from tests.conftest import SHARED_DATA


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _records(data_dir, name: str, split: str) -> list[dict]:
    source = built.open_split(built.open_builder(str(data_dir), name)[0], split)
    return [source[i] for i in range(len(source))]


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
    report = build(
        "csv",
        str(root),
        str(tmp_path / "out"),
        name="squares",
        image_size=192,
        split_column="split",
        mask_column="mask",
        mask_dir="masks",
        boxes_csv="boxes.csv",
    )
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
    (root / "manifest.csv").write_text(
        "image,mask,split\na.png,ok.png,train\nb.png,small.png,train\nc.png,gone.png,train\nd.png,ok.png,train\n"
    )
    (root / "boxes.csv").write_text("image,label,x,y,w,h\nd.png,x,40,0,20,10\nzz.png,x,0,0,1,1\n")
    report = build(
        "csv",
        str(root),
        str(tmp_path / "out"),
        name="bad",
        image_size=0,
        mask_column="mask",
        boxes_csv="boxes.csv",
        split_column="split",
    )
    assert report["records_written_total"] == 2
    skipped = report["skipped"]
    assert skipped[R.MASK_UNREADABLE]["count"] == 1 and "mask is 48x30 px" in skipped[R.MASK_UNREADABLE]["examples"][0]
    assert skipped[R.MASK_MISSING]["count"] == 1 and "gone.png" in skipped[R.MASK_MISSING]["examples"][0]
    assert report["boxes_fixed"] == {"clipped": 1}  # d.png's box crosses the right edge: clipped to it
    d = next(r for r in _records(tmp_path / "out", "bad", "train") if r["image_id"] == b"d")
    np.testing.assert_array_equal(d["boxes"], [[40, 0, 48, 10]])
    assert any("zz.png" in note for note in report["notes"])
    (root / "manifest.csv").write_text("image,mask,split\na.png,ok.png,train\nb.png,small.png,test\n")
    with pytest.raises(R.InputError, match="every record of that split was skipped"):
        build(
            "csv", str(root), str(tmp_path / "out2"), name="bad", image_size=0, mask_column="mask", split_column="split"
        )


def _mask_set(root, masks: dict[str, np.ndarray]) -> None:
    """Images 32x48 with the given masks (saved as PNG in their own mode: 'P' for a palette label map)."""
    root.mkdir(parents=True)
    for name, mask in masks.items():
        Image.fromarray(np.full((32, 48), 90, np.uint8)).save(root / f"{name}.png")
        if name.startswith("label"):  # a palette image whose indices are the classes, as label maps are stored
            image = Image.frombytes("P", (48, 32), mask.tobytes())
            image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        else:
            image = Image.fromarray(mask)
        image.save(root / f"{name}_mask.png")
    rows = "".join(f"{name}.png,{name}_mask.png,train\n" for name in masks)
    (root / "manifest.csv").write_text("image,mask,split\n" + rows)


def _square(value: int) -> np.ndarray:
    mask = np.zeros((32, 48), np.uint8)
    mask[8:16, 10:30] = value
    return mask


@pytest.mark.parametrize("value", [1, 127, 255])
def test_a_mask_of_one_foreground_value_is_read_as_meant_whatever_the_value(value, tmp_path):
    """0/1 label maps (most segmentation sets), 0/127 and 0/255 masks all give the same foreground; reading
    them as > 127 made the first two empty, silently."""
    _mask_set(tmp_path / "raw", {"a": _square(value), "b": _square(value), "c": np.zeros((32, 48), np.uint8)})
    report = build(
        "csv",
        str(tmp_path / "raw"),
        str(tmp_path / "out"),
        name="m",
        image_size=0,
        mask_column="mask",
        split_column="split",
    )
    assert report["masks"]["per_split"] == {"train": {"masks": 3, "empty": 1}}
    assert report["masks"]["foreground_values_found"] == {f"{value}": 2}
    for record in _records(tmp_path / "out", "m", "train"):
        want = _square(1) if record["image_id"] != b"c" else np.zeros((32, 48), np.uint8)
        np.testing.assert_array_equal(_decode(record["mask"]).reshape(32, 48), want)


def test_a_label_map_of_several_classes_is_refused_naming_the_values_then_read_by_class(tmp_path, capsys):
    label_map = _square(1)
    label_map[20:28, 10:30] = 2  # two organs
    _mask_set(tmp_path / "raw", {"label_a": label_map, "label_b": _square(2)})
    with pytest.raises(
        R.InputError,
        match=r"mask values 1, 2 besides 0: a label map of several classes.*"
        r"--mask_values",
    ):
        build(
            "csv",
            str(tmp_path / "raw"),
            str(tmp_path / "out"),
            name="m",
            image_size=0,
            mask_column="mask",
            split_column="split",
        )
    report = build(
        "csv",
        str(tmp_path / "raw"),
        str(tmp_path / "out"),
        name="m",
        image_size=0,
        mask_column="mask",
        split_column="split",
        mask_values="2",
    )
    assert report["masks"]["mask_values"] == "2"
    for record in _records(tmp_path / "out", "m", "train"):
        want = (label_map == 2) if record["image_id"] == b"label_a" else _square(1)
        np.testing.assert_array_equal(_decode(record["mask"]).reshape(32, 48), want)
    # one value per mask, but a different one from mask to mask: two encodings, or classes; refused too
    _mask_set(
        tmp_path / "raw2",
        {
            "a": _square(1),
            "b": _square(255),
            "c": np.zeros((32, 48), np.uint8),
            "d": np.zeros((32, 48), np.uint8),
            "e": np.zeros((32, 48), np.uint8),
        },
    )
    with pytest.raises(R.InputError, match=r"different non-zero values \(1: 1 masks, 255: 1 masks\)"):
        build(
            "csv",
            str(tmp_path / "raw2"),
            str(tmp_path / "out2"),
            name="m",
            image_size=0,
            mask_column="mask",
            split_column="split",
        )
    report = build(
        "csv",
        str(tmp_path / "raw2"),
        str(tmp_path / "out2"),
        name="m",
        image_size=0,
        mask_column="mask",
        split_column="split",
        mask_values="nonzero",
    )
    assert report["masks"]["per_split"]["train"] == {"masks": 5, "empty": 3}
    assert "WARNING: 3 of the 5 masks of split train are empty" in capsys.readouterr().out


def test_boxes_with_swapped_corners_outside_or_without_area_are_fixed_and_counted(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "a.png")
    (root / "manifest.csv").write_text("image,split\na.png,train\n")
    (root / "boxes.csv").write_text(
        "image,label,x,y,w,h\na.png,swapped,30,20,-10,-8\na.png,flat,5,5,10,0\n"
        "a.png,outside,60,0,10,10\na.png,edge,-4,-2,10,10\na.png,kept,1,1,4,4\n"
    )
    report = build(
        "csv", str(root), str(tmp_path / "out"), name="b", image_size=0, boxes_csv="boxes.csv", split_column="split"
    )
    assert report["boxes_fixed"] == {"corners_swapped": 1, "clipped": 1, "dropped": 2}
    (record,) = _records(tmp_path / "out", "b", "train")
    np.testing.assert_array_equal(record["boxes"], [[20, 12, 30, 20], [0, 0, 6, 8], [1, 1, 5, 5]])
    assert [x.decode() for x in record["box_labels"]] == ["swapped", "edge", "kept"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "covid_lung_masks")), reason="shared data absent")
def test_real_lung_masks_build_binary_and_aligned(tmp_path):
    root = os.path.join(SHARED_DATA, "covid_lung_masks")
    report = build(
        "csv",
        root,
        str(tmp_path),
        name="lungs",
        manifest="metadata.csv",
        image_column="filename",
        image_dir="images",
        mask_column="mask",
        mask_dir="masks",
        group_column="patientid",
        view_column="view",
        views="all",
        image_size=128,
        num_workers=2,
    )
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
    from mvlp_jax.evaluation.dense.metrics import dice_per_image

    truth = np.zeros((4, 4, 4), bool)
    predicted = np.zeros((4, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 true pixels
    predicted[0, :2, :3] = True  # 6 predicted, 4 overlapping: 2 * 4 / (4 + 6) = 0.8
    truth[1, 0, 0] = True  # a missed finding: 0
    predicted[2, 3, 3] = True  # a false alarm on an empty image: 0
    np.testing.assert_allclose(dice_per_image(predicted, truth), [0.8, 0.0, 0.0, 1.0])  # empty / empty: 1


def test_paired_difference_uses_the_same_patient_resamples():
    from mvlp_jax.evaluation import statistics

    rng = np.random.default_rng(0)
    a, b, groups = rng.uniform(size=30), rng.uniform(size=30), np.repeat(np.arange(10), 3)
    out = statistics.paired([lambda i: np.mean(a[i])], [lambda i: np.mean(b[i] + 0.1)], groups, 200, 3)
    diffs = [np.mean(b[d] + 0.1 - a[d]) for d in statistics.bootstrap_indices(groups, 200, 3)]
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


@pytest.mark.parametrize("patch", [8, 16])
def test_the_simple_feature_pyramid_feeds_both_heads_at_a_quarter_of_the_patch(patch):
    import jax
    import jax.numpy as jnp

    from mvlp_jax.models.dense_heads import CenterNet, ProgressiveUpsampling, SimpleFeaturePyramid

    tokens = jnp.ones((2, 3, 5, 12))
    pyramid = SimpleFeaturePyramid(width=8)
    variables = pyramid.init(jax.random.PRNGKey(0), tokens)
    assert pyramid.apply(variables, tokens).shape == (2, 12, 20, 8)
    lateral = {k: v["kernel"].shape for k, v in variables["params"].items() if k[:-1] == "lateral_"}
    # strides p/4 (two transposed convs: D/4 channels), p/2 (one: D/2), p and 2p (the tokens, max pooled)
    assert lateral == {
        "lateral_0": (1, 1, 3, 8),
        "lateral_1": (1, 1, 6, 8),
        "lateral_2": (1, 1, 12, 8),
        "lateral_3": (1, 1, 12, 8),
    }
    masks = ProgressiveUpsampling(patch_size=patch, channels=(8, 4), decoder="pyramid")
    assert "pyramid" in masks.init(jax.random.PRNGKey(0), tokens)["params"]
    assert masks.apply(masks.init(jax.random.PRNGKey(0), tokens), tokens).shape == (2, 3 * patch, 5 * patch, 1)
    boxes = CenterNet(patch_size=patch, classes=2, channels=(8, 4), head_width=4, decoder="pyramid")
    heat, size, offset = boxes.apply(boxes.init(jax.random.PRNGKey(0), tokens), tokens)
    cells = (3 * patch // boxes.stride(), 5 * patch // boxes.stride())
    assert heat.shape == (2, *cells, 2) and size.shape == offset.shape == (2, *cells, 2) and cells == (12, 20)
    with pytest.raises(ValueError, match="patch size 2 is below 4"):
        CenterNet(patch_size=2, decoder="pyramid").init(jax.random.PRNGKey(0), tokens)


def test_auto_decoder_follows_the_encoder_and_grafting_checks_shapes():
    from mvlp_jax.evaluation.dense.task import decoder_for
    from mvlp_jax.evaluation.dense.training import graft

    assert (decoder_for("auto", "vit"), decoder_for("auto", "vitdet")) == ("upsampling", "pyramid")
    assert decoder_for("pyramid", "vit") == "pyramid"
    params = {"model": {"encoder": {"w": np.zeros((2, 3)), "b": np.zeros(3)}}, "head": {"w": np.zeros(4)}}
    grafted = graft(params, {"model": {"encoder": {"w": np.ones((2, 3)), "b": np.ones(3), "mask_token": 1}}})
    assert grafted["model"]["encoder"]["w"].sum() == 6 and grafted["head"] is params["head"]
    assert set(grafted["model"]["encoder"]) == {"w", "b"}  # pretraining-only weights are left out
    with pytest.raises(ValueError, match=r"params/model/encoder/w: pretrained shape \(3, 3\)"):
        graft(params, {"model": {"encoder": {"w": np.ones((3, 3)), "b": np.ones(3)}}})
    with pytest.raises(ValueError, match="params/model/encoder/b is missing from the pretrained weights"):
        graft(params, {"model": {"encoder": {"w": np.ones((2, 3))}}})
    with pytest.raises(ValueError, match="params/pool is not a parameter"):
        graft(params, {"pool": {}})


def test_a_head_on_a_frozen_encoder_learns_real_lung_masks(nih_and_workdir, tmp_path):
    """The evaluation binary on the shipped lung masks: the head's Dice beats the empty-mask predictor's (0 on
    every image with lungs) by far, the paired comparison and the picture are written."""
    import json

    from configs import segmentation
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.tools.demo import DATASETS

    _, workdir = nih_and_workdir
    options = dict(DATASETS["covid_lungs"], image_size=64)
    build("csv", options.pop("input_dir"), str(tmp_path / "tfds"), name="covid_lungs", **options)
    c = segmentation.get_config("demo")
    c.data_dir, c.workdirs, c.bootstrap = str(tmp_path / "tfds"), f"{workdir},random_init", 100
    c.label_fractions, c.segmentation.epochs, c.segmentation.channels = (1.0,), 8, (16, 8)
    c.seeds = 1  # one head each: this test is about learning (tests/test_evaluate.py covers seeds)
    results = evaluate.evaluate(c, str(tmp_path / "out"))
    for row in results["segmentation"]:
        assert row["dice"]["mean"] > 0.5, row  # the empty mask scores 0 on every test image showing lungs
        assert row["dice_nonempty"]["mean"] > 0.5  # 12 of the 210 shipped masks are empty: Dice over the rest
        assert row["head"]["epoch"] >= 1 and np.isfinite(row["head"]["val_loss"])
    (comparison,) = results["comparisons"]
    assert comparison["candidate"] == "random_init" and comparison["label_fraction"] == 1.0
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["segmentation"][0]["dice"] == results["segmentation"][0]["dice"]
    assert "SETR-PUP, frozen encoder" in open(tmp_path / "out" / "results.md").read()
    assert "Dice, non-empty masks [95% CI]" in open(tmp_path / "out" / "results.md").read()
    assert os.path.getsize(tmp_path / "out" / "segmentation.png") > 10_000


def _coco_map(detections, truths, num_classes):
    """pycocotools' mAP over IoU 0.40:0.75 on the same boxes (the independent reference)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from mvlp_jax.evaluation.dense.metrics import IOU_THRESHOLDS

    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i} for i in range(len(truths))],
        "categories": [{"id": c} for c in range(num_classes)],
        "annotations": [
            {
                "id": len(truths) * 100 + i * 50 + k,
                "image_id": i,
                "category_id": int(label),
                "bbox": xywh(box),
                "area": float(np.prod(box[2:] - box[:2])),
                "iscrowd": 0,
            }
            for i, (boxes, labels) in enumerate(truths)
            for k, (box, label) in enumerate(zip(boxes, labels))
        ],
    }
    gt.createIndex()
    dt = gt.loadRes(
        [
            {"image_id": i, "category_id": int(label), "bbox": xywh(box), "score": float(score)}
            for i, (boxes, scores, labels) in enumerate(detections)
            for box, score, label in zip(boxes, scores, labels)
        ]
    )
    evaluation = COCOeval(gt, dt, "bbox")
    evaluation.params.iouThrs = np.array(IOU_THRESHOLDS)
    evaluation.evaluate()
    evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # all areas, 100 detections
    return float(np.mean(precision[precision > -1]))


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size * 0.7, size=(n, 2))
    wh = rng.uniform(5, size * 0.3, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_average_precision_matches_pycocotools_on_random_boxes(seed):
    from mvlp_jax.evaluation.dense.metrics import match_image, mean_average_precision

    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for _ in range(25):
        true_boxes = _random_boxes(rng, rng.integers(0, 4))
        true_labels = rng.integers(0, 3, len(true_boxes))
        # detections: jittered copies of some true boxes (hits at various IoUs) and random false alarms
        found = rng.random(len(true_boxes)) < 0.7
        hits = true_boxes[found] + rng.normal(0, 4, size=(int(found.sum()), 4))
        boxes = np.concatenate([hits, _random_boxes(rng, rng.integers(0, 4))])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = np.concatenate([true_labels[found], rng.integers(0, 3, len(boxes) - len(hits))])
        truths.append((true_boxes, true_labels))
        detections.append((boxes, rng.uniform(size=len(boxes)), labels))
    matches = [match_image(b, s, lab, tb, tl, 3) for (b, s, lab), (tb, tl) in zip(detections, truths)]
    ours = mean_average_precision(matches, np.arange(len(matches)))
    assert 0.05 < ours < 0.95
    np.testing.assert_allclose(ours, _coco_map(detections, truths, 3), atol=1e-9)


def test_perfect_detections_score_one_and_none_score_zero():
    from mvlp_jax.evaluation.dense.metrics import match_image, mean_average_precision

    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 30]], float)
    labels = np.array([0, 1])
    perfect = match_image(boxes, np.array([0.9, 0.8]), labels, boxes, labels, 2)
    nothing = match_image(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), boxes, labels, 2)
    assert mean_average_precision([perfect], np.array([0])) == 1.0
    assert mean_average_precision([nothing], np.array([0])) == 0.0
    assert mean_average_precision([perfect, nothing], np.array([0, 1])) == pytest.approx(0.5, abs=0.01)


def test_centernet_targets_decode_back_to_their_boxes():
    """Outputs equal to the training targets (heatmap peaks as logits, sizes and offsets at the centres) decode
    to the true boxes: mAP 1 against them. Checks the target encoding, decoding and scoring together."""
    from mvlp_jax.evaluation.dense import detection
    from mvlp_jax.evaluation.dense.metrics import match_image, mean_average_precision

    boxes = [np.array([[4.0, 6.0, 30.0, 50.0], [36.0, 8.0, 60.0, 52.0]]), np.array([[10.0, 10.0, 20.0, 18.0]])]
    labels = [np.array([0, 0]), np.array([1])]
    t = detection.targets(boxes, labels, size=64, stride=4, classes=2)
    assert t["heatmap"].shape == (2, 16, 16, 2) and t["heatmap"].max() == 1.0 and t["box_mask"].sum() == 3
    logit = np.log(np.clip(t["heatmap"], 1e-6, 1 - 1e-6) / (1 - np.clip(t["heatmap"], 1e-6, 1 - 1e-6)))
    cells = lambda key: (
        np.stack(
            [
                np.bincount(t["index"][n], t[key][n][:, d] * t["box_mask"][n], 256).reshape(16, 16)
                for n in range(2)
                for d in range(2)
            ]
        )
        .reshape(2, 2, 16, 16)
        .transpose(0, 2, 3, 1)
    )
    decoded = detection.decode((logit, cells("size"), cells("offset")), stride=4)
    for (got, scores, _), want in zip(decoded, boxes):
        best = np.argsort(-scores)[: len(want)]
        order = np.lexsort(got[best].T[::-1])
        np.testing.assert_allclose(got[best][order], want[np.lexsort(want.T[::-1])], atol=1e-5)
    matches = [match_image(*d, b, lab, 2) for d, b, lab in zip(decoded, boxes, labels)]
    assert mean_average_precision(matches, np.arange(2)) == pytest.approx(1.0)


def test_boxes_cropped_to_the_evaluation_view():
    from mvlp_jax.evaluation.dense.detection import crop_boxes

    # a 100 x 200 image (height x width): the centred 100 x 100 square starts at x = 50, then scales by 0.5
    boxes, kept = crop_boxes(np.array([[60, 10, 100, 50], [0, 0, 40, 40], [140, 90, 180, 100]], float), 100, 200, 50)
    np.testing.assert_allclose(boxes, [[5, 5, 25, 25], [45, 45, 50, 50]])
    assert kept.tolist() == [True, False, True]


def test_boxes_from_masks_find_each_part():
    from data_prep.boxes_from_masks import part_boxes

    mask = np.zeros((40, 60), np.uint8)
    mask[5:30, 4:20] = 255
    mask[8:35, 30:50] = 255
    mask[0, 59] = 255  # a speck under min_fraction
    assert part_boxes(mask, 0.005) == [(4.0, 5.0, 16.0, 25.0), (30.0, 8.0, 20.0, 27.0)]


def test_a_detection_head_on_a_frozen_encoder_finds_real_lungs(nih_and_workdir, tmp_path):
    from configs import detection
    from data_prep.boxes_from_masks import write_boxes
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.tools.demo import DATASETS

    _, workdir = nih_and_workdir
    options = dict(DATASETS["covid_lungs"], image_size=64)
    input_dir = options.pop("input_dir")
    options.pop("mask_column")
    assert write_boxes(input_dir, "manifest.csv", "image", "mask", "", "lung", 0.005, str(tmp_path / "b.csv")) > 300
    build(
        "csv", input_dir, str(tmp_path / "tfds"), name="covid_lung_boxes", boxes_csv=str(tmp_path / "b.csv"), **options
    )
    c = detection.get_config("demo")
    c.data_dir, c.workdirs, c.bootstrap = str(tmp_path / "tfds"), workdir, 100
    c.label_fractions, c.detection.epochs, c.detection.channels = (1.0,), 12, (16, 8)
    c.seeds = 1
    (row,) = evaluate.evaluate(c, str(tmp_path / "out"))["detection"]
    assert row["test_images"] >= 10 and row["map"]["ci95"][0] <= row["map"]["mean"] <= row["map"]["ci95"][1]
    assert row["map"]["mean"] > 0.1, row  # no detection scores 0
    assert os.path.getsize(tmp_path / "out" / "detection.png") > 10_000


def test_fine_tuning_a_vitdet_for_segmentation_moves_its_encoder_through_the_pyramid(
    pretrain_data, tmp_path, monkeypatch
):
    """mode=finetune on a ViTDet checkpoint: 'auto' picks the simple feature pyramid, the encoder's weights move
    (the patch embedding least, by layer decay), the pretraining-only weights are left out, and the lungs are
    found (the empty mask scores 0)."""
    import jax

    from configs import segmentation
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.evaluation.dense import finetune, training
    from mvlp_jax.pretrain import train
    from mvlp_jax.tools.demo import DATASETS
    from tests.pretrain_setup import micro_config

    data_dir, emb, _ = pretrain_data
    workdir = str(tmp_path / "vitdet")
    train.train(
        micro_config(data_dir, emb, total_steps=2, **{"model.encoder": "vitdet", "model.window_size": 2}), workdir
    )
    options = dict(DATASETS["covid_lungs"], image_size=64)
    build("csv", options.pop("input_dir"), str(tmp_path / "tfds"), name="covid_lungs", **options)
    c = segmentation.get_config("demo")
    c.data_dir, c.workdirs, c.bootstrap, c.mode = str(tmp_path / "tfds"), workdir, 100, "finetune"
    c.label_fractions, c.segmentation.epochs, c.segmentation.channels = (1.0,), 6, (16, 8)
    c.seeds = 1
    trained, loaded = [], []
    fit, pretrained = training.fit, finetune.pretrained
    monkeypatch.setattr(training, "fit", lambda **kw: trained.append(fit(**kw)) or trained[-1])
    monkeypatch.setattr(finetune, "pretrained", lambda e: loaded.append(pretrained(e)) or loaded[-1])
    (row,) = evaluate.evaluate(c, str(tmp_path / "out"))["segmentation"]
    assert row["head"]["kind"] == "simple feature pyramid + upsampling" and row["head"]["encoder"] == "fine-tuned"
    assert row["dice"]["mean"] > 0.5, row
    assert "simple feature pyramid + upsampling, fine-tuned encoder" in open(tmp_path / "out" / "results.md").read()
    after = trained[0].variables["params"]["model"]["encoder"]
    before = loaded[0]["model"]["encoder"]
    assert set(before) - set(after) == {"mask_token"}  # SimMIM's, which evaluation never reads
    before = {k: before[k] for k in after}
    assert set(trained[0].variables["params"]["model"]) == {"encoder"}
    change = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).mean())
    moved = jax.tree.map(change, after, before)
    assert all(v > 0 for v in jax.tree.leaves(moved))
    top = np.mean(jax.tree.leaves(moved["encoder"][max(k for k in moved["encoder"] if k.startswith("block_"))]))
    assert np.mean(jax.tree.leaves(moved["embedding"])) < top


def test_segmentation_refuses_a_test_split_of_empty_masks_and_scores_non_empty_masks_apart():
    """An empty mask predicted empty scores Dice 1: a split of empty masks is refused, and Dice over the images
    with a non-empty mask stands beside Dice over all images."""
    from mvlp_jax.evaluation.dense.segmentation import TASK

    empty = {"patients": np.array(["a", "b"]), "targets": {"mask": np.zeros((2, 4, 4), bool)}}
    with pytest.raises(ValueError, match="every mask of lungs:1.0.0/test is empty"):
        TASK.check(empty, "lungs:1.0.0/test")
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2, :2] = True
    truth = {"patients": np.array(["a", "b", "c"]), "targets": {"mask": masks}}
    TASK.check(truth, "lungs:1.0.0/test")
    scores, predicted = TASK.score(np.full((3, 4, 4, 1), -1.0), truth, 4, {})  # an untrained head: all empty
    assert not predicted.any()
    assert scores["dice"](np.arange(3)) == pytest.approx(2 / 3)  # the two empty images score 1 each
    assert scores["dice_nonempty"](np.arange(3)) == 0.0 and np.isnan(scores["dice_nonempty"](np.array([1, 2])))


def test_a_boxes_csv_naming_no_image_of_the_manifest_is_refused(tmp_path):
    """Boxes keyed by file name while the manifest names 'images/a.png': nothing matched, the build said
    'skipped: none', and detection failed later."""
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "images" / "a.png")
    (root / "manifest.csv").write_text("image,split\nimages/a.png,train\n")
    (root / "boxes.csv").write_text("image,label,x,y,w,h\na.png,nodule,1,1,4,4\n")
    with pytest.raises(
        R.InputError,
        match=r"none of the 1 images of boxes.csv is a value of the manifest's 'image' "
        r"column \(e.g. 'a.png'; the manifest has values like 'images/a.png'\)",
    ):
        build(
            "csv", str(root), str(tmp_path / "out"), name="b", image_size=0, boxes_csv="boxes.csv", split_column="split"
        )


def test_the_pyramids_2x_upsampling_is_a_transposed_convolution():
    """upsample_2x (a Dense layer and a depth-to-space reshape, fast on a CPU) computes what a 2x2 stride-2
    transposed convolution does: with that convolution's kernel (flipped, as flax applies it), equal outputs."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mvlp_jax.models.dense_heads import upsample_2x

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 5))
    convolution = nn.ConvTranspose(6, (2, 2), strides=(2, 2))
    params = convolution.init(jax.random.PRNGKey(0), x)["params"]
    kernel = np.asarray(params["kernel"])[::-1, ::-1].transpose(2, 0, 1, 3).reshape(5, 24)

    class Up(nn.Module):
        @nn.compact
        def __call__(self, y):
            return upsample_2x(y, 6, "up")

    dense = {"params": {"up": {"kernel": jnp.asarray(kernel), "bias": jnp.tile(params["bias"], 4)}}}
    np.testing.assert_allclose(Up().apply(dense, x), convolution.apply({"params": params}, x), atol=1e-5)
    initial = Up().init(jax.random.PRNGKey(2), jnp.ones((1, 8, 8, 400)))["params"]["up"]["kernel"]
    assert float(jnp.std(initial)) == pytest.approx(np.sqrt(1 / (4 * 400)), rel=0.05)  # the 2x2 kernel's fan-in
