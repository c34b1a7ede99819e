"""What every dataset source produces: raw records, label coding, skip accounting.

A source (MIMIC-CXR, IU X-ray, NIH14, a CSV manifest) scans its input into `RawRecord`s without
decoding images; `tfds_builder` then decodes, resizes and writes them. Anything a source or the
decoder rejects goes through one `SkipLog`, so `build_report.json` counts every dropped record by
reason, and `--strict` turns the first one into an error that names the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

# Label coding shared by every source and by the rest of the project.
POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED = 1, 0, -1, -2

# The version every dataset is built at (TFDS folder NAME/VERSION); a change to the record schema bumps it.
BUILDER_VERSION = "1.0.0"

CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)  # the column order of mimic-cxr-2.0.0-chexpert.csv
NIH14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# Skip reasons, as they appear in build_report.json.
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
REPORT_MISSING = "report_missing"
BAD_LABEL_VALUE = "bad_label_value"
VIEW_NOT_SELECTED = "view_not_selected"
NO_SPLIT = "no_split"
DUPLICATE_IMAGE = "duplicate_image_id"
MASK_MISSING = "mask_missing"
MASK_UNREADABLE = "mask_unreadable"
MASK_ENCODING = "mask_encoding"  # never skipped: the build stops and names --mask_values

SPLIT_NAMES = ("train", "validate", "test")


class BadRecordError(ValueError):
    """A record was rejected while building with --strict."""


class InputError(ValueError):
    """The input as a whole is unusable (missing files or columns, nothing to build)."""


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One image to write, before decoding. Text fields are '' when the source has none."""

    split: str
    image_path: str
    image_id: str
    study_id: str
    subject_id: str
    view: str = ""
    report: str = ""
    findings: str = ""
    impression: str = ""
    labels: tuple[int, ...] = ()
    mask_path: str = ""  # a segmentation mask of the image's size (0 background, >127 foreground)
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # (x0, y0, x1, y1) in the source image's pixels
    box_labels: tuple[str, ...] = ()
    slice_position: float = float("nan")  # a slice's place in its series (z in mm or an index), for volumes


@dataclasses.dataclass
class SourceScan:
    """A source's scan result: the records per split plus what the builder writes as metadata."""

    source: str
    source_version: str
    label_names: tuple[str, ...]
    records: list[RawRecord]
    records_read: int
    skips: SkipLog
    description: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    annotations: tuple[str, ...] = ()  # what every record carries beyond the core: "mask", "boxes",
    # "slice_position"

    def drop_duplicate_ids(self) -> None:
        """Keeps the first record of each image id; later ones are skipped and counted.

        Real manifests repeat rows (one image filed under two cases); a duplicate could otherwise
        land in two splits and leak test images into training.
        """
        seen: set[str] = set()
        kept = []
        for record in self.records:
            if record.image_id in seen:
                self.skips.skip(DUPLICATE_IMAGE, record.image_path, f"image id {record.image_id!r} seen before")
                continue
            seen.add(record.image_id)
            kept.append(record)
        self.records = kept

    def splits(self) -> dict[str, list[RawRecord]]:
        by_split: dict[str, list[RawRecord]] = {}
        for record in self.records:
            by_split.setdefault(record.split, []).append(record)
        return by_split


class SkipLog:
    """Counts rejected records per reason and keeps the first few offending paths."""

    def __init__(self, strict: bool = False, max_examples: int = 5):
        self.strict = strict
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        message = f"{where}: {detail}" if detail else where
        if self.strict:
            raise BadRecordError(f"{reason}: {message} (rerun without --strict to skip and count such records)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    def merge(self, other: SkipLog) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            room = self.max_examples - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[: max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict]:
        return {r: {"count": c, "examples": self.examples.get(r, [])} for r, c in sorted(self.counts.items())}


def code_label(value: str | float | None) -> int:
    """Maps a CheXpert-style cell (1.0 / 0.0 / -1.0 / blank) to the project's int coding.

    Raises ValueError for anything else, so a corrupt cell is never silently read as 'negative'.
    """
    if value is None:
        return NOT_MENTIONED
    text = str(value).strip()
    if text == "" or text.lower() == "nan":
        return NOT_MENTIONED
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"label value {text!r} is not one of 1, 0, -1 or blank") from None
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {text!r} is not one of 1, 0, -1 or blank")
    return int(number)


def code_labels(row: dict, columns: Sequence[str]) -> tuple[int, ...]:
    """Codes the named columns of a CSV row; ValueError names the offending column."""
    coded = []
    for column in columns:
        try:
            coded.append(code_label(row.get(column)))
        except ValueError as e:
            raise ValueError(f"column {column!r}: {e}") from None
    return tuple(coded)


def view_selected(view: str, views: str) -> bool:
    """`frontal` keeps PA and AP acquisitions (including 'AP Supine', 'PA erect', ...); `all` keeps all."""
    if views == "all":
        return True
    words = view.strip().upper().split()
    return bool(words) and words[0] in ("PA", "AP")


def seeded_split(group: str, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """Assigns a group (a patient) to train/validate/test by a hash of (seed, group).

    Independent of record order and of the other groups, so adding data never moves a patient.
    """
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLIT_NAMES, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLIT_NAMES[len(fractions) - 1]
