"""Builds a TFDS dataset (ArrayRecord shards) from MIMIC-CXR, IU X-ray, NIH14 or a CSV manifest.

  python -m data_prep.build_dataset --source=mimic_cxr --input_dir=/data/mimic --output_dir=/data/tfds

writes `{output_dir}/{name}/1.0.0/` (readable with `tfds.builder_from_directory` and grain) plus
`build_report.json` there: records read, written per split, skipped per reason with examples. The
build happens in a temporary folder renamed into place at the end, so a failed build never leaves
anything that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time

from absl import app, flags

from data_prep.images import SATURATED, parse_mask_values, parse_window
from data_prep.sources import SOURCE_NAMES, get_scanner
from mvlp_jax.data import records as R
from mvlp_jax.runtime import cli, storage

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, list(SOURCE_NAMES), "Layout of --input_dir.")
flags.DEFINE_string("input_dir", None, "Folder holding the raw data set.")
flags.DEFINE_string("output_dir", None, "TFDS data dir: the dataset goes to {output_dir}/{name}/1.0.0.")
flags.DEFINE_string("name", "", "Dataset name (folder); default: the source name ('csv' -> 'cxr_csv').")
flags.DEFINE_integer("image_size", 512, "Shorter image side after resize (aspect kept, never upsampled; 0 keeps).")
flags.DEFINE_integer("channels", 1, "1 stores grayscale; 3 keeps colour (fundus photographs, dermoscopy, slides).")
flags.DEFINE_string(
    "window",
    "",
    "16-bit files: '' stretches each image's range; 'L,W' a level/width window in "
    "the file's pixel units less --intensity_offset ('2048,4096'); 'pLO,HI' each image's percentiles "
    "('p0.5,99.5'); several separated by ';', one channel each (--channels=3: '40,400;-600,1500;400,1800'); or a "
    "CT preset in Hounsfield units: ct_soft (40,400), ct_lung (-600,1500), ct_bone (400,1800), ct_brain (40,80), "
    "ct_soft_lung_bone (the three as channels).",
)
flags.DEFINE_float(
    "intensity_offset",
    0.0,
    "16-bit files: subtracted from the stored values before the window (a PNG holding Hounsfield units + 32768: "
    "32768).",
)
flags.DEFINE_string(
    "mask_values",
    "auto",
    "Which stored mask values are foreground: 'auto' (a mask's one non-zero "
    "value: 0/1, 0/255 alike; several stop the build), 'nonzero', '>T' (e.g. '>127' for blurred or "
    "JPEG masks), or label values '1,2' (the classes of a label map).",
)
flags.DEFINE_enum("views", "frontal", ["frontal", "all"], "frontal keeps PA/AP acquisitions only.")
flags.DEFINE_boolean("strict", False, "Fail on the first bad record instead of skipping and counting it.")
flags.DEFINE_integer("num_workers", 1, "Processes decoding and resizing images in parallel.")
flags.DEFINE_integer("seed", 0, "Seed of patient-level splits (iu_xray, csv without split column, nih14 val).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing dataset of the same name and version.")
# iu_xray / nih14
flags.DEFINE_string("labels_csv", "", "iu_xray: CheXpert label CSV (subject_id = report uid).")
flags.DEFINE_float("val_fraction", 0.1, "nih14: fraction of train_val patients held out as 'validate'.")
# csv
flags.DEFINE_string("manifest", "", "csv: manifest path or SPLIT=PATH,... (relative to --input_dir).")
flags.DEFINE_string("image_column", "image", "csv: column with the image path.")
flags.DEFINE_string("image_dir", "", "csv: folder (relative to --input_dir) the image paths are relative to.")
flags.DEFINE_string("text_column", "", "csv: column with the report / notes text.")
flags.DEFINE_string("label_columns", "", "csv: comma-separated label columns (1/0/-1/blank).")
flags.DEFINE_string("split_column", "", "csv: column with the split name; default a seeded split.")
flags.DEFINE_string("id_column", "", "csv: unique image id column; default the image file name.")
flags.DEFINE_string("group_column", "", "csv: patient column for patient-level splits.")
flags.DEFINE_string("study_column", "", "csv: study column (text embeddings join on it); default the image id.")
flags.DEFINE_string("view_column", "", "csv: view position column (filtered by --views).")
flags.DEFINE_string("mask_column", "", "csv: column with a segmentation mask path (0 / 255, the image's size).")
flags.DEFINE_string("mask_dir", "", "csv: folder (relative to the manifest's) the mask paths are relative to.")
flags.DEFINE_string(
    "slice_position_column",
    "",
    "csv: column with each slice's position in its series (z in mm or an index): the order in which the 3D "
    "encoder stacks a series' slices (default: by image id).",
)
flags.DEFINE_string("boxes_csv", "", "csv: boxes table (relative to --input_dir): image, label, x, y, w, h.")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def build(
    source: str,
    input_dir: str,
    output_dir: str,
    *,
    name: str = "",
    image_size: int = 512,
    views: str = "frontal",
    strict: bool = False,
    num_workers: int = 1,
    overwrite: bool = False,
    channels: int = 1,
    window: str = "",
    intensity_offset: float = 0.0,
    mask_values: str = "auto",
    **source_options,
) -> dict:
    """Scans, decodes and writes one dataset; returns the build report (also written as JSON). Images are stored
    as 8-bit grayscale, or colour with `channels=3`; 16-bit files go through `window` (images.parse_window)."""
    import tensorflow_datasets as tfds  # heavy: imported here so decode workers never load it

    from data_prep.tfds_builder import VERSION, builder_class

    name = name or ("cxr_csv" if source == "csv" else source)
    if not _NAME.match(name):
        raise R.InputError(f"--name={name!r}: use lower case letters, digits and underscores")
    if storage.is_remote(input_dir):
        raise R.InputError(
            f"--input_dir={input_dir}: the raw data must be a local folder (the sources scan it with "
            f"the operating system): copy it down first (gcloud storage cp -r {input_dir} /data/...)"
        )
    if not os.path.isdir(input_dir):
        raise R.InputError(f"--input_dir={input_dir} is not a folder")
    if image_size < 0:
        raise R.InputError(f"--image_size={image_size}: give the shorter side in pixels (> 0), or 0 to keep the size")
    if channels not in (1, 3):
        raise R.InputError(f"--channels={channels}: 1 (grayscale) or 3 (colour)")
    try:
        windowing = parse_window(window, intensity_offset)
        parse_mask_values(mask_values)
    except ValueError as error:
        raise R.InputError(str(error)) from None
    if len(windowing.windows) > 1 and channels != len(windowing.windows):
        raise R.InputError(
            f"--window={window} gives {len(windowing.windows)} windows, one channel each: pass "
            f"--channels={len(windowing.windows)} (--channels={channels})"
        )
    if intensity_offset and not window:
        raise R.InputError(
            f"--intensity_offset={intensity_offset:g} shifts the values a --window is given in: give one"
        )
    remote = storage.is_remote(output_dir)
    if not remote and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise R.InputError(f"--output_dir={output_dir} is a file, not a folder: choose another --output_dir")
    if remote:
        storage.check_writable_dir(output_dir, "--output_dir")
    final_dir = storage.join(output_dir, name, VERSION)
    if storage.path(final_dir).exists() and not overwrite:
        raise R.InputError(f"{final_dir} already exists; pass --overwrite to rebuild it")

    start = time.perf_counter()
    scan = get_scanner(source)(input_dir, views=views, strict=strict, **source_options)
    scan.drop_duplicate_ids()
    if not scan.records:
        raise R.InputError(
            f"nothing to build from {input_dir}: {scan.records_read} records read, skipped {scan.skips.as_dict()}"
        )
    print(
        f"{source}: {scan.records_read} records read, {len(scan.records)} to decode "
        f"({scan.skips.total} skipped while scanning)",
        flush=True,
    )

    # staged beside the output (renamed into place) or, for a gs:// output, in a local folder uploaded at the end
    local_root = tempfile.mkdtemp(prefix="mvlp-build-") if remote else output_dir
    os.makedirs(local_root, exist_ok=True)
    if not os.access(local_root, os.W_OK | os.X_OK):
        raise R.InputError(f"--output_dir={output_dir} is not writable: choose a folder you can write")
    remove_abandoned_staging(local_root, name)
    staging = os.path.join(local_root, f".staging-{name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    decode_skips = R.SkipLog(strict)
    try:
        tfds.disable_progress_bar()
        builder = builder_class(name)(
            scan=scan,
            image_size=image_size,
            num_workers=num_workers,
            decode_skips=decode_skips,
            channels=channels,
            window=window,
            intensity_offset=intensity_offset,
            mask_values=mask_values,
            data_dir=staging,
            file_format="array_record",
        )
        try:
            builder.download_and_prepare()
        except AssertionError as error:  # TFDS refuses a split that yielded nothing
            if "No examples were yielded" not in str(error):
                raise
            raise R.InputError(
                f"{error}: every record of that split was skipped while decoding ({decode_skips.as_dict()})"
            ) from None
        written = {split: info.num_examples for split, info in builder.info.splits.items()}
        masks = mask_summary(builder, mask_values)
        check_window(builder, window, sum(written.values()))
        if builder.box_fixes:
            print(
                "boxes fixed while building (recorded in build_report.json): "
                + ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in sorted(builder.box_fixes.items())),
                flush=True,
            )
        if sum(written.values()) == 0:
            raise R.InputError(f"every record of {input_dir} was skipped: {decode_skips.as_dict()}")
        skips = R.SkipLog()
        skips.merge(scan.skips)
        skips.merge(decode_skips)
        elapsed = time.perf_counter() - start
        report = {
            "source": source,
            "name": name,
            "version": VERSION,
            "source_version": scan.source_version,
            "input_dir": os.path.abspath(input_dir),
            "image_size": image_size,
            "views": views,
            "channels": channels,
            "window": window,
            "windows": windowing.describe(),
            "intensity_offset": intensity_offset,
            **({"masks": masks} if masks else {}),
            **({"boxes_fixed": dict(builder.box_fixes)} if "boxes" in scan.annotations else {}),
            "source_bit_depths": {str(bits): n for bits, n in sorted(builder.bit_depths.items())},
            "window_saturated": builder.saturated,
            "label_names": list(scan.label_names),
            "annotations": list(scan.annotations),
            "records_read": scan.records_read,
            "records_written": written,
            "records_written_total": sum(written.values()),
            "skipped": skips.as_dict(),
            "skipped_total": skips.total,
            "notes": scan.notes,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(len(scan.records) / elapsed, 2),
            "command": " ".join(sys.argv),
        }
        staged_dir = os.path.join(staging, name, VERSION)
        with open(os.path.join(staged_dir, "build_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if storage.path(final_dir).exists():
            storage.path(final_dir).rmtree()
        if remote:  # dataset_info.json last: a version without it is not complete to readers
            storage.copy_tree(staged_dir, final_dir, last=("dataset_info.json",))
        else:
            os.makedirs(os.path.dirname(final_dir), exist_ok=True)
            os.replace(staged_dir, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if remote:
            shutil.rmtree(local_root, ignore_errors=True)
    report["dataset_dir"] = final_dir
    return report


def check_window(builder, window: str, written: int) -> None:
    """--window applies to files of more than 8 bits: refused when there are none (it would be recorded and do
    nothing); images it turned (nearly) all black or all white are counted, and warned about when they are many."""
    if not window:
        return
    deep = sum(n for bits, n in builder.bit_depths.items() if bits > 8)
    if not deep:
        raise R.InputError(
            f"--window={window} applies to 16-bit (or deeper) files, and every input of this build is "
            f"8-bit: drop --window"
        )
    if builder.saturated:
        print(
            f"WARNING: --window={window} put more than {SATURATED:.0%} of the pixels at one end (all black or all "
            f"white) in {builder.saturated} of {deep} images: is the window in the files' units? (a CT stored as "
            f"Hounsfield units + 32768 needs --intensity_offset=32768)",
            flush=True,
        )
    if deep < written:
        print(f"note: {written - deep} of the {written} images are 8-bit: --window left them as they are", flush=True)


def mask_summary(builder, mask_values: str) -> dict:
    """What the masks held: per split how many and how many empty (warned about when most are), the non-zero
    values found; with --mask_values=auto, masks whose one value differs from mask to mask (a label map of several
    classes, or two encodings) stop the build, naming the values and the flag."""
    if not builder.masks:
        return {}
    found = {f"{v:g}": n for v, n in sorted(builder.mask_values.items())}
    if mask_values == "auto" and len(found) > 1:
        counts = ", ".join(f"{v}: {n} masks" for v, n in found.items())
        raise R.InputError(
            f"the masks hold different non-zero values ({counts}): a label map of several classes, "
            f"or two encodings? Say which values are foreground with --mask_values (e.g. "
            f"--mask_values={next(iter(found))}, or nonzero)"
        )
    per_split = {split: {"masks": c["masks"], "empty": c["empty"]} for split, c in sorted(builder.masks.items())}
    for split, c in per_split.items():
        if c["empty"] > c["masks"] / 2:
            print(
                f"WARNING: {c['empty']} of the {c['masks']} masks of split {split} are empty (no foreground under "
                f"--mask_values={mask_values}): check the encoding; Dice over such masks says little",
                flush=True,
            )
    return {"mask_values": mask_values, "foreground_values_found": found, "per_split": per_split}


def remove_abandoned_staging(output_dir: str, name: str) -> list[str]:
    """Deletes the staging folders of builds of `name` whose process is gone (killed builds)."""
    removed = []
    for entry in os.listdir(output_dir):
        match = re.fullmatch(rf"\.staging-{re.escape(name)}-(\d+)", entry)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
            removed.append(entry)
    if removed:
        print(f"removed the staging folder(s) of interrupted builds: {', '.join(removed)}", flush=True)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summary_line(report: dict) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in sorted(report["records_written"].items()))
    skipped = ", ".join(f"{k} {v['count']}" for k, v in report["skipped"].items()) or "none"
    return (
        f"built {report['name']}: {report['records_written_total']} images ({splits}) in "
        f"{report['elapsed_s']:.1f}s ({report['images_per_s']:.1f} img/s); skipped: {skipped} -> "
        f"{report['dataset_dir']}"
    )


def main(argv: list[str]) -> None:
    del argv
    for required in ("source", "input_dir", "output_dir"):
        if FLAGS[required].value is None:
            raise app.UsageError(f"--{required} is required")
    options = dict(
        seed=FLAGS.seed,
        labels_csv=FLAGS.labels_csv,
        val_fraction=FLAGS.val_fraction,
        manifest=FLAGS.manifest,
        image_column=FLAGS.image_column,
        image_dir=FLAGS.image_dir,
        text_column=FLAGS.text_column,
        label_columns=FLAGS.label_columns,
        split_column=FLAGS.split_column,
        id_column=FLAGS.id_column,
        group_column=FLAGS.group_column,
        study_column=FLAGS.study_column,
        view_column=FLAGS.view_column,
        mask_column=FLAGS.mask_column,
        mask_dir=FLAGS.mask_dir,
        boxes_csv=FLAGS.boxes_csv,
        slice_position_column=FLAGS.slice_position_column,
    )
    report = build(
        FLAGS.source,
        FLAGS.input_dir,
        FLAGS.output_dir,
        name=FLAGS.name,
        image_size=FLAGS.image_size,
        views=FLAGS.views,
        strict=FLAGS.strict,
        num_workers=FLAGS.num_workers,
        overwrite=FLAGS.overwrite,
        channels=FLAGS.channels,
        window=FLAGS.window,
        intensity_offset=FLAGS.intensity_offset,
        mask_values=FLAGS.mask_values,
        **options,
    )
    print(summary_line(report))


def run_binary() -> None:
    """`python -m data_prep.build_dataset` (`mvlp-build-dataset`)."""
    cli.run("build_dataset", main)


if __name__ == "__main__":
    run_binary()
