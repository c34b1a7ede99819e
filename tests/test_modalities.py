"""Any image modality: colour kept when asked (--channels=3), 16-bit files windowed instead of truncated, and
the encoder reading the channel count its dataset stores, through training, evaluation and pictures."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

# equal luminance (ITU-R 601, PIL's "L"): told apart only by colour
RED, BLUE = (180, 110, 110), (110, 125, 220)


def _colour_set(root: str, per_split: dict[str, int], size: int = 40) -> None:
    """Images whose label is their tint (red 1, blue 0) over a shared random texture; a CSV manifest."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = ["image,patient,split,red"]
    for split, count in per_split.items():
        for i in range(count):
            red = i % 2
            texture = rng.integers(-30, 31, (size, size, 1))
            pixels = np.clip(np.array(RED if red else BLUE)[None, None] + texture, 0, 255).astype(np.uint8)
            name = f"{split}_{i}.png"
            Image.fromarray(pixels, "RGB").save(os.path.join(root, "images", name))
            rows.append(f"images/{name},{split}{i},{split},{red}")
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def _sixteen_bit_set(root: str, count: int = 20, size: int = 40) -> None:
    """16-bit scans whose values span 1000..3000 (a range 8-bit truncation would clip or crush)."""
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    rows = ["image,patient"]
    for i in range(count):
        ramp = np.linspace(1000, 3000, size * size).reshape(size, size)
        Image.fromarray((ramp + rng.integers(0, 50, ramp.shape)).clip(0, 65535).astype(np.uint16)).save(
            os.path.join(root, f"{i}.png")
        )
        rows.append(f"{i}.png,p{i}")
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def _built(dataset_dir: str, split: str = "train"):
    """(builder, random-access source of `split` with images as stored PNG bytes)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(dataset_dir)
    return builder, builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def _stored(dataset_dir: str, split: str = "train") -> Image.Image:
    return Image.open(io.BytesIO(_built(dataset_dir, split)[1][0]["image"]))


def test_windows_map_sixteen_bits_to_eight():
    from data_prep.images import parse_window, to_uint8

    scan = Image.fromarray(np.array([[1000, 2000, 3000, 5000]], np.uint16))
    assert np.asarray(to_uint8(scan, 1, parse_window("2000,2000"))).tolist() == [[0, 128, 255, 255]]
    assert np.asarray(to_uint8(scan, 1)).tolist() == [[0, 64, 128, 255]]  # each image's own range
    low, high = np.percentile([1000, 2000, 3000, 5000], (0, 50))
    assert np.asarray(to_uint8(scan, 1, parse_window("p0,50"))).tolist() == [
        [0, round((2000 - low) * 255 / (high - low)), 255, 255]
    ]
    assert np.asarray(to_uint8(scan, 3, parse_window("2000,2000"))).shape == (1, 4, 3)  # grey kept as colour
    for bad in ("2000", "2000,0", "p50,10", "level,width", "nan,100", "100,inf", "40,400;2000", "ct_liver"):
        with pytest.raises(ValueError, match="--window"):
            parse_window(bad)


def _hu_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """A radiologist's window as the formula reads: [level - width/2, level + width/2] -> 0..255, rounded."""
    return np.round(np.clip((hu - (level - width / 2)) / width * 255.0, 0, 255)).astype(np.uint8)


def test_several_hounsfield_windows_become_the_channels_of_one_image():
    from data_prep.images import CT_WINDOWS, parse_window, to_uint8

    hu = np.array([[-1000, -600, -100, 0, 40, 240, 400, 1300]], np.float64)
    stored = Image.fromarray((hu + 32768).astype(np.uint16))  # how the CT PNGs hold Hounsfield units
    windowing = parse_window("ct_soft_lung_bone", offset=32768)
    assert CT_WINDOWS["ct_soft_lung_bone"] == "40,400;-600,1500;400,1800" and windowing.describe() == [
        {"level": 40.0, "width": 400.0},
        {"level": -600.0, "width": 1500.0},
        {"level": 400.0, "width": 1800.0},
    ]
    rgb = np.asarray(to_uint8(stored, 3, windowing))
    for channel, (level, width) in enumerate([(40, 400), (-600, 1500), (400, 1800)]):
        np.testing.assert_array_equal(rgb[..., channel], _hu_window(hu, level, width))
    np.testing.assert_array_equal(
        np.asarray(to_uint8(stored, 1, parse_window("ct_soft", 32768))), _hu_window(hu, 40, 400)
    )
    with pytest.raises(ValueError, match="3 windows make 3 channels; --channels=1"):
        to_uint8(stored, 1, windowing)


def test_colour_and_sixteen_bit_builds_record_what_they_kept(tmp_path):
    from data_prep.build_dataset import build
    from mvlp_jax.data import built
    from mvlp_jax.data.records import InputError

    _colour_set(str(tmp_path / "colour"), {"train": 4})
    rgb = build(
        "csv",
        str(tmp_path / "colour"),
        str(tmp_path / "tfds"),
        name="colour",
        channels=3,
        split_column="split",
        image_size=0,
    )
    assert rgb["channels"] == 3 and rgb["source_bit_depths"] == {"8": 4}
    stored = _stored(rgb["dataset_dir"])
    assert stored.mode == "RGB" and stored.getpixel((0, 0))[2] > stored.getpixel((0, 0))[0]  # the first is blue
    builder, _, _ = built.open_builder(str(tmp_path / "tfds"), "colour")
    assert built.channels(builder) == 3 and builder.info.metadata["channels"] == 3
    gray = build(
        "csv", str(tmp_path / "colour"), str(tmp_path / "tfds"), name="gray", split_column="split", image_size=0
    )
    assert _stored(gray["dataset_dir"]).mode == "L" and gray["channels"] == 1

    _sixteen_bit_set(str(tmp_path / "scans"), count=4)
    windowed = build(
        "csv",
        str(tmp_path / "scans"),
        str(tmp_path / "tfds"),
        name="scans",
        window="2000,2000",
        split_column="",
        image_size=0,
    )
    assert windowed["source_bit_depths"] == {"16": 4} and windowed["window"] == "2000,2000"
    pixels = np.asarray(_stored(windowed["dataset_dir"], next(iter(windowed["records_written"]))))
    assert pixels.dtype == np.uint8 and pixels[0, 0] < 10 and pixels[-1, -1] > 245  # 1000..3000 spans 0..255
    with pytest.raises(InputError, match="--channels=2"):
        build("csv", str(tmp_path / "scans"), str(tmp_path / "tfds"), name="bad", channels=2)
    with pytest.raises(InputError, match="--window='p99,1'"):
        build("csv", str(tmp_path / "scans"), str(tmp_path / "tfds"), name="bad", window="p99,1")


def test_an_encoder_trained_on_colour_reads_three_channels_and_its_probe_sees_the_tint(tmp_path):
    """Labels that only colour carries (equal luminance): the probe of a colour encoder separates them."""
    import jax

    from data_prep.build_dataset import build
    from mvlp_jax.configuration import load
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.pretrain import encoder as encoder_lib
    from mvlp_jax.pretrain import train
    from tests.pretrain_setup import micro_config

    _colour_set(str(tmp_path / "colour"), {"train": 48, "test": 24})
    build(
        "csv",
        str(tmp_path / "colour"),
        str(tmp_path / "tfds"),
        name="colour",
        channels=3,
        split_column="split",
        label_columns="red",
        group_column="patient",
        image_size=0,
    )
    config = micro_config(
        str(tmp_path / "tfds"), "", objectives={"mae": 1.0, "query_box": 1.0}, total_steps=2, log_images_every_steps=2
    )
    config.data.dataset, config.query_box.size = "colour", 16
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    recorded, _ = load(workdir)
    assert recorded.data.channels == 3  # 0 in the config: the dataset's count, written down for evaluation
    encoder = encoder_lib.load(workdir, -1, _mesh())
    kernels = [
        leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(encoder.params["encoder"])
        if "kernel" in str(path) and len(leaf.shape) == 4
    ]
    assert kernels and kernels[0][2] == 3  # the patch embedding (p, p, channels, width) reads colour
    assert {"reconstruction_2.png", "query_box_2.png", "attention_2.png"} <= set(os.listdir(f"{workdir}/plots"))

    probe = _probe_config(str(tmp_path / "tfds"), "colour", workdir)
    results = evaluate.evaluate(probe, str(tmp_path / "eval"))
    assert results["checkpoints"][0]["mauc"] > 0.9, results["checkpoints"][0]

    # the Hugging Face export reads colour too: its processor and model take an RGB image (the card once said
    # "grayscale, 1 input channel" and the processor had one mean, failing on RGB and grey alike)
    import torch
    import transformers

    from mvlp_jax.tools import export

    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    card = export.export(
        encoder_lib.load(workdir, -1, one_device),
        str(tmp_path / "hf"),
        results=str(tmp_path / "eval" / "results.json"),
        workdir=workdir,
    )
    text = open(card).read()
    assert "3-channel colour crops" in text and "(3 input channels)" in text and "linear probe, 100% of the" in text
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    model = transformers.ViTMAEModel.from_pretrained(str(tmp_path / "hf")).eval()
    pixels = processor(images=Image.new("RGB", (40, 40), RED), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=pixels).last_hidden_state).all()

    config.data.channels = 1  # asking for grey on a colour dataset is refused, not silently converted
    with pytest.raises(ValueError, match="stores 3-channel images"):
        train.train(config, str(tmp_path / "grey_run"))


def test_training_on_a_windowed_sixteen_bit_set(tmp_path):
    from data_prep.build_dataset import build
    from mvlp_jax.pretrain import train
    from tests.pretrain_setup import micro_config

    _sixteen_bit_set(str(tmp_path / "scans"), count=24)
    build(
        "csv",
        str(tmp_path / "scans"),
        str(tmp_path / "tfds"),
        name="scans",
        window="p1,99",
        image_size=0,
        group_column="patient",
    )
    config = micro_config(str(tmp_path / "tfds"), "", objectives={"mae": 1.0}, total_steps=2)
    config.data.dataset = "scans"
    assert train.train(config, str(tmp_path / "run")).last_step == 2
    with open(os.path.join(tmp_path, "run", "config.json")) as f:
        assert json.load(f)["data"]["channels"] == 1


def _mesh():
    import jax

    from mvlp_jax.runtime import sharding

    return jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.AXES)


def _probe_config(data_dir: str, dataset: str, workdir: str):
    from configs import linear_probe

    c = linear_probe.get_config(None)
    c.data_dir, c.dataset, c.workdirs, c.val_split = data_dir, dataset, workdir, ""
    c.label_fractions, c.bootstrap = (1.0,), 50
    return c


def test_a_window_on_eight_bit_files_is_refused_and_one_that_washes_images_out_is_counted(tmp_path, capsys):
    from data_prep.build_dataset import build
    from mvlp_jax.data.records import InputError

    _colour_set(str(tmp_path / "colour"), {"train": 4})
    with pytest.raises(InputError, match="--window=40,400 applies to 16-bit .* every input of this build is 8-bit"):
        build(
            "csv",
            str(tmp_path / "colour"),
            str(tmp_path / "tfds"),
            name="rgb",
            window="40,400",
            split_column="split",
            image_size=0,
        )
    _sixteen_bit_set(str(tmp_path / "scans"), count=4)  # values 1000..3050: a window at 40 +- 200 is all white
    report = build(
        "csv",
        str(tmp_path / "scans"),
        str(tmp_path / "tfds"),
        name="white",
        window="40,400",
        split_column="",
        image_size=0,
    )
    assert report["window_saturated"] == 4
    assert "WARNING: --window=40,400 put more than 95% of the pixels at one end" in capsys.readouterr().out


@pytest.mark.skipif(
    not os.path.isdir(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "sts_ct")
    ),
    reason="shared data absent",
)
def test_a_hounsfield_window_on_ct_stored_with_an_offset_is_caught(tmp_path, capsys):
    """The real CT slices store HU + 32768: a soft-tissue window given in HU (40, 400) turns every slice white,
    which the build once reported as 'skipped: none'."""
    from data_prep.build_dataset import build
    from mvlp_jax.data.records import InputError
    from tests.conftest import SHARED_DATA

    report = build(
        "csv",
        os.path.join(SHARED_DATA, "sts_ct"),
        str(tmp_path / "tfds"),
        name="ct",
        window="40,400",
        group_column="patient_id",
        split_column="split",
        image_size=32,
    )
    assert report["window_saturated"] == report["records_written_total"] == 158
    assert "is the window in the files' units?" in capsys.readouterr().out
    shifted = build(
        "csv",
        os.path.join(SHARED_DATA, "sts_ct"),
        str(tmp_path / "tfds"),
        name="ct_shifted",
        window="32808,400",
        group_column="patient_id",
        split_column="split",
        image_size=32,
    )
    assert shifted["window_saturated"] < 158 // 4
    with pytest.raises(InputError, match="3 windows, one channel each: pass --channels=3"):
        build("csv", os.path.join(SHARED_DATA, "sts_ct"), str(tmp_path / "tfds"), name="x", window="ct_soft_lung_bone")
    ct = build(
        "csv",
        os.path.join(SHARED_DATA, "sts_ct"),
        str(tmp_path / "tfds"),
        name="ct_windows",
        window="ct_soft_lung_bone",
        intensity_offset=32768,
        channels=3,
        group_column="patient_id",
        split_column="split",
        mask_column="mask",
        image_size=0,
    )
    assert ct["windows"][1] == {"level": -600.0, "width": 1500.0} and ct["intensity_offset"] == 32768
    assert ct["source_bit_depths"] == {"16": 158} and ct["window_saturated"] < 158 // 4
    builder, source = _built(ct["dataset_dir"], "test")
    assert builder.info.metadata["windows"] == ct["windows"] and builder.info.metadata["intensity_offset"] == 32768
    manifest = {row["image"]: row for row in csv.DictReader(open(os.path.join(SHARED_DATA, "sts_ct", "manifest.csv")))}
    record = source[0]
    row = next(r for r in manifest.values() if r["image"].endswith(record["image_id"].decode() + ".png"))
    hu = np.asarray(Image.open(os.path.join(SHARED_DATA, "sts_ct", row["image"])), np.float64) - 32768
    stored = np.asarray(Image.open(io.BytesIO(record["image"])))
    for channel, (level, width) in enumerate([(40, 400), (-600, 1500), (400, 1800)]):
        np.testing.assert_array_equal(stored[..., channel], _hu_window(hu, level, width))
