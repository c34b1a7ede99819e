"""Image <-> report retrieval in a run's shared image-text space (`--config.evaluator=retrieval`).

Every image of a held-out split is embedded by the run's encoder, pooling and image projection; every study's
stored report vector (the frozen LLM's, as trained against) by its text projection. Image -> report: the rank of
the image's own study among all the split's reports. Report -> image: the best rank of any of the study's
images among all the split's images (big_vision's convention: a hit if any match is in the top k). Recall@1/5/10
and median rank, with 95% intervals resampling patients. Heads with batch statistics (M-FLAG's) normalise over
all the split's images and all its reports (mvlp_jax/evaluation/shared_space.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.data import built
from mvlp_jax.data import targets as targets_lib
from mvlp_jax.evaluation import common, report, shared_space, statistics
from mvlp_jax.models.norm import l2_normalise
from mvlp_jax.pretrain.encoder import Encoder
from mvlp_jax.runtime import run_inputs

KS = (1, 5, 10)


def ranks(similarity: np.ndarray, image_study: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """similarity (images, studies); image_study[i] = column of image i's study. Returns 1-based ranks, 1 + the
    number of strictly better candidates: (per image, of its own report among all reports; per study, of its
    best image among all images)."""
    own = similarity[np.arange(len(similarity)), image_study]
    image_to_report = 1 + (similarity > own[:, None]).sum(axis=1)
    descending = np.sort(-similarity, axis=0)  # per study, the images' scores from the best
    rank_in_study = 1 + np.stack(
        [np.searchsorted(descending[:, s], -similarity[:, s], side="left") for s in range(similarity.shape[1])], axis=1
    )  # (image, study)
    report_to_image = np.array([rank_in_study[image_study == s, s].min() for s in range(similarity.shape[1])])
    return image_to_report, report_to_image


def summary(rank: np.ndarray, groups: np.ndarray, num: int, seed: int) -> dict:
    """Recall@k and median rank, each with a 95% interval over resamples of whole patients."""
    out = {}
    for k in KS:
        estimate = statistics.estimate([lambda i, k=k: float(np.mean(rank[i] <= k))], groups, num, seed)
        out[f"R@{k}"], out[f"R@{k}_ci95"] = estimate["mean"], estimate["ci95"]
    estimate = statistics.estimate([lambda i: float(np.median(rank[i]))], groups, num, seed)
    out["median_rank"], out["median_rank_ci95"] = estimate["mean"], estimate["ci95"]
    return out


def evaluate_run(encoder: Encoder, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    space = shared_space.resolve(encoder)
    builder, name, version = built.open_builder(config.data_dir, config.dataset)
    source = built.open_split(builder, config.test_split)
    where = f"{name}:{version}/{config.test_split}"
    if len(source) == 0:
        raise ValueError(f"split {where} is empty")
    embeddings = config.embeddings or encoder.config.data.embeddings_dir
    notes = run_inputs.check_embeddings(
        encoder.workdir, embeddings, own=not config.embeddings, allow=config.allow_changed_inputs, purpose="retrieval"
    )
    table = targets_lib.load_targets(embeddings, encoder.config.contrastive.target)
    if table.dim != encoder.model.target_dim:
        raise ValueError(
            f"{embeddings} holds {table.dim}-wide vectors; {encoder.name} was trained on "
            f"{encoder.model.target_dim}-wide ones"
        )
    records = [source[i] for i in range(len(source))]
    image_studies = [r["study_id"].decode() for r in records]
    studies = sorted(set(image_studies))
    rows = targets_lib.join(
        studies,
        table,
        False,
        where,
        role="test",
        fix=f"retrieval ranks each test image's own report among the split's, so every study "
        f"needs its report's vector: give --config.embeddings=... holding the reports of "
        f"{where} (a split built without reports has none)",
    )
    column = {s: i for i, s in enumerate(studies)}
    image_study = np.array([column[s] for s in image_studies])
    patients = np.array([r["subject_id"].decode() for r in records])
    statistics.require(patients, where, config.bootstrap > 0)

    images = shared_space.embed_images(encoder, space, source, config, mesh, f"retrieval {encoder.name} {where}")
    texts = shared_space.embed_texts(encoder, space, table.vectors[rows])
    similarity = np.asarray(l2_normalise(jnp.asarray(images)) @ l2_normalise(jnp.asarray(texts)).T)
    image_to_report, report_to_image = ranks(similarity, image_study)
    study_patient = np.array([patients[image_study == s][0] for s in range(len(studies))])
    return {
        "name": encoder.name,
        "workdir": encoder.source,
        "step": encoder.step,
        "split": where,
        "images": len(records),
        "studies": len(studies),
        "embeddings": embeddings,
        "notes": [*encoder.notes, *notes],
        "image_to_report": summary(image_to_report, patients, config.bootstrap, config.seed),
        "report_to_image": summary(report_to_image, study_patient, config.bootstrap, config.seed),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| checkpoint | step | direction | images / studies | R@1 [95% CI] | R@5 [95% CI] | R@10 [95% CI] | "
        "median rank [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cell = lambda d, key, fmt: f"{d[key]:{fmt}} [{d[key + '_ci95'][0]:{fmt}}, {d[key + '_ci95'][1]:{fmt}}]"
    for r in rows:
        for direction in ("image_to_report", "report_to_image"):
            d = r[direction]
            lines.append(
                f"| {r['name']} | {r['step']} | {direction.replace('_', ' ')} | {r['images']} / "
                f"{r['studies']} | "
                + " | ".join(cell(d, f"R@{k}", ".3f") for k in KS)
                + f" | {cell(d, 'median_rank', '.1f')} |"
            )
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, output_dir: str, mesh: jax.sharding.Mesh) -> dict:
    rows = []
    for _, encoder in common.encoders(
        config, mesh, text_space="retrieval compares trained image and report embeddings"
    ):
        rows.append(evaluate_run(encoder, config, mesh))
        r = rows[-1]
        print(
            f"{r['name']} (step {r['step']}), {r['split']}: image -> report R@1 {r['image_to_report']['R@1']:.3f}, "
            f"report -> image R@1 {r['report_to_image']['R@1']:.3f} ({r['images']} images, {r['studies']} "
            f"studies; chance R@1 {1 / r['studies']:.3f})",
            flush=True,
        )
    results = {
        "config": config.to_dict(),
        "retrieval": rows,
        "notes": list(dict.fromkeys(n for r in rows for n in r["notes"])),
    }
    report.save(output_dir, results, table(rows))
    return results


EVALUATOR = common.Evaluator(
    name="retrieval",
    run=run,
    rules=(common.IMAGE_ENCODERS_ONLY, common.TRAINS_NOTHING),
    description="image <-> report Recall@k and median rank on test_split, in the run's image-text space (reports "
    "from `embeddings`, default the run's own)",
)
