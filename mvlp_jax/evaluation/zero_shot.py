"""Zero-shot classification from text prompts (`--config.evaluator=zero_shot`).

Each label's prompts (mvlp_jax/evaluation/zero_shot_prompts.py: CheXzero's pair, or BioViL-style ensembles) are read
by the same frozen LLM, layer and pooling the run's report targets came from (the run's embedding manifest; a
different LLM is refused), then through the run's text projection (a head with batch statistics normalises
prompts with those of the run's training reports, images with those of the whole evaluated split); a prompt
set's embedding is the renormalised mean of its prompts'. An image's score for a label compares its cosine
similarities to the positive and the negative set (`label_scores`: ranked and thresholded as CheXzero's softmax
over the pair).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.data import embedding_shards
from mvlp_jax.data import targets as targets_lib
from mvlp_jax.evaluation import common, features, metrics, report, shared_space, statistics, zero_shot_prompts
from mvlp_jax.models.frozen_lm import FrozenLM
from mvlp_jax.models.norm import l2_normalise
from mvlp_jax.pretrain.encoder import Encoder
from mvlp_jax.runtime import run_inputs, schema

Embedder = Callable[[list[str]], np.ndarray]  # prompts -> (P, LLM hidden) stored-style vectors


def llm_embedder(manifest: dict, pooling: str, llm: str) -> Embedder:
    """Prompts -> vectors by the LLM of `manifest` (the run's targets'), refusing any other weights."""
    model = llm or ("smollm2" if manifest["model"].startswith("HuggingFaceTB/SmolLM2-135M") else "")
    if not model:
        raise ValueError(
            f"the run's report targets came from {manifest['model']}: pass that model as "
            f"--config.llm=DIR (its checkpoint directory or .gguf file)"
        )
    lm = FrozenLM(model, layer=manifest["layer"], dtype=manifest.get("compute_dtype", "float32"))
    if lm.hash != manifest["weights_sha256"]:
        raise ValueError(
            f"--config.llm={model} is not the LLM the run's targets came from: weights sha256 "
            f"{lm.hash[:12]}..., the targets' {manifest['weights_sha256'][:12]}... ({manifest['model']})"
        )

    def embed(texts: list[str]) -> np.ndarray:
        out = lm.embed(texts, manifest.get("max_tokens", 512), False)
        return np.stack([mean if pooling == "mean" else last for mean, last, _ in out]).astype(np.float32)

    return embed


def label_scores(image_embeddings: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """(N, L) scores in [0, 1]: 0.5 + (cos(image, positive) - cos(image, negative)) / 4, in float64.

    The softmax over the two similarities is a monotone function of their difference with its 0.5 threshold
    where the difference is 0, so AUC and exact-match accuracy are the same as the softmax's at any
    temperature; unlike a float softmax it never saturates into ties."""
    images = np.asarray(l2_normalise(jnp.asarray(image_embeddings)), np.float64)
    margin = images @ positive.astype(np.float64).T - images @ negative.astype(np.float64).T
    return 0.5 + margin / 4.0


def prompt_set_embeddings(z: np.ndarray, sets: list[list[int]]) -> np.ndarray:
    """(len(sets), E): per set, the renormalised mean of its prompts' unit embeddings `z`."""
    z = l2_normalise(jnp.asarray(z))
    return np.stack([np.asarray(l2_normalise(z[jnp.asarray(idx)].mean(axis=0))) for idx in sets])


def training_reports(encoder: Encoder, limit: int = 4096) -> np.ndarray:
    """Up to `limit` of the run's stored report vectors, evenly spaced: the reference set whose statistics a
    text head with batch statistics normalises prompts with."""
    vectors = targets_lib.load_targets(encoder.config.data.embeddings_dir, encoder.config.contrastive.target).vectors
    return vectors[np.linspace(0, len(vectors) - 1, min(limit, len(vectors))).astype(int)]


def evaluate_run(
    encoder: Encoder, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, embed: Embedder | None = None
) -> dict:
    space = shared_space.resolve(encoder)
    source, names, where = features.labelled_split(config.data_dir, config.dataset, config.test_split)
    labels, patients = features.read_labels(source)
    y, mask = common.targets_and_mask(labels, config.uncertain, config.unmentioned)
    statistics.require(patients, where, config.bootstrap > 0)
    notes = run_inputs.check_embeddings(
        encoder.workdir,
        encoder.config.data.embeddings_dir,
        own=True,
        allow=config.allow_changed_inputs,
        purpose="zero-shot",
    )
    if embed is None:
        manifest = embedding_shards.read_manifest(encoder.config.data.embeddings_dir)
        embed = llm_embedder(manifest, encoder.config.contrastive.target, config.llm)
    prompts = {n: zero_shot_prompts.prompts(n, config.prompts) for n in names}
    texts = sorted({t for pos, neg in prompts.values() for t in pos + neg})
    vectors = embed(texts)
    index = {t: i for i, t in enumerate(texts)}
    z = shared_space.embed_texts(encoder, space, vectors, reference=lambda: training_reports(encoder))
    positive = prompt_set_embeddings(z, [[index[t] for t in prompts[n][0]] for n in names])
    negative = prompt_set_embeddings(z, [[index[t] for t in prompts[n][1]] for n in names])
    images = shared_space.embed_images(encoder, space, source, config, mesh, f"zero-shot {encoder.name} {where}")
    probs = label_scores(images, positive, negative)
    return {
        "name": encoder.name,
        "workdir": encoder.source,
        "step": encoder.step,
        "split": where,
        "mode": "zero_shot",
        "prompts": config.prompts,
        "test_cases": len(probs),
        "notes": [*encoder.notes, *notes],
        "prompt_sets": {n: {"positive": list(p), "negative": list(q)} for n, (p, q) in prompts.items()},
        **metrics.summary(y, probs, mask, names),
        "ci95": {
            "mauc": statistics.estimate(
                [lambda i: metrics.mean_auc(y[i], probs[i], mask[i])], patients, config.bootstrap, config.seed
            )["ci95"],
            "accuracy": statistics.estimate(
                [lambda i: metrics.exact_match_accuracy(y[i], probs[i], mask[i])],
                patients,
                config.bootstrap,
                config.seed,
            )["ci95"],
        },
    }


def table(rows: list[dict]) -> str:
    names = list(rows[0]["auc"]) if rows else []
    lines = [
        "| checkpoint | step | prompts | mAUC [95% CI] | exact-match acc. [95% CI] | " + " | ".join(names) + " |",
        "| --- " * (5 + len(names)) + "|",
    ]
    for r in rows:
        ci = r["ci95"]
        aucs = " | ".join("n/a" if not np.isfinite(a) else f"{a:.3f}" for a in r["auc"].values())
        lines.append(
            f"| {r['name']} | {r['step']} | zero-shot, {r['prompts']} | {r['mauc']:.4f} [{ci['mauc'][0]:.4f}, "
            f"{ci['mauc'][1]:.4f}] | {r['accuracy']:.4f} [{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}] | "
            f"{aucs} |"
        )
    return "\n".join(lines)


def run(
    config: ml_collections.ConfigDict, output_dir: str, mesh: jax.sharding.Mesh, embed: Embedder | None = None
) -> dict:
    rows = []
    for _, encoder in common.encoders(config, mesh, text_space="zero-shot scores images against embedded prompts"):
        rows.append(evaluate_run(encoder, config, mesh, embed))
        r = rows[-1]
        print(
            f"{r['name']} (step {r['step']}), {r['split']}, zero-shot ({r['prompts']} prompts): mAUC "
            f"{r['mauc']:.4f} [{r['ci95']['mauc'][0]:.4f}, {r['ci95']['mauc'][1]:.4f}]",
            flush=True,
        )
    results = {
        "config": config.to_dict(),
        "zero_shot": rows,
        "notes": list(dict.fromkeys(n for r in rows for n in r["notes"])),
    }
    report.save(output_dir, results, table(rows))
    return results


ROWS: schema.Table = {
    "prompts": (
        "pair",
        ("pair", "ensemble"),
        "zero_shot: CheXzero's '{label}' vs 'no {label}', or BioViL-style ensembles of phrasings "
        "(mvlp_jax/evaluation/zero_shot_prompts.py).",
    ),
    "llm": (
        "",
        None,
        "zero_shot: the frozen LLM that reads the prompts (checkpoint dir, .gguf, or 'smollm2'); '' "
        "takes the one named in the run's embedding manifest where it can be found (the embedded SmolLM2). A "
        "model whose weights differ from those the run's targets came from is refused.",
    ),
}

EVALUATOR = common.Evaluator(
    name="zero_shot",
    run=run,
    config_rows=ROWS,
    rules=(common.IMAGE_ENCODERS_ONLY, common.TRAINS_NOTHING),
    description="per-label AUC on test_split from text prompts read by the run's LLM, no training",
)
