"""A run is bound to the data and targets it trained on: `WORKDIR/inputs.json` holds fingerprints of the training split
(built.fingerprint) and of the LLM embeddings (embedding_shards.fingerprint). A resume, and an evaluation that reads
the run's own targets (retrieval, zero-shot, pictures of nearest reports), compare them with what is there now and
refuse a change by name; `allow_changed_inputs` overrides, and then every result of the run says so."""

from __future__ import annotations

from typing import Any

from mvlp_jax.data import built, embedding_shards
from mvlp_jax.runtime import storage

FILE = "inputs.json"
OVERRIDE = "data.allow_changed_inputs"


def current(builder: Any, split: str, embeddings_dir: str) -> dict:
    """The fingerprints of a run's inputs as they are now."""
    return {
        "data": built.fingerprint(builder, [split]),
        "embeddings": embedding_shards.fingerprint(embeddings_dir) if embeddings_dir else None,
    }


def recorded(workdir: str) -> dict | None:
    path = storage.path(workdir) / FILE
    return storage.read_json(path) if path.exists() else None


def differences(before: dict, now: dict) -> list[str]:
    """What changed between two records of a run's inputs, in words ([] when nothing did)."""
    out = []
    if before.get("data") and now.get("data") and before["data"]["sha256"] != now["data"]["sha256"]:
        out.append(f"dataset {now['data']['dataset']} changed ({built.describe_change(before['data'], now['data'])})")
    if (before.get("embeddings") or {}).get("sha256") != (now.get("embeddings") or {}).get("sha256"):
        out.append(
            "LLM embeddings changed ("
            + describe_embeddings_change(before.get("embeddings"), now.get("embeddings"))
            + ")"
        )
    return out


def describe_embeddings_change(before: dict | None, now: dict | None) -> str:
    if not before or not now:
        return f"{'none' if not before else 'some'} -> {'none' if not now else 'some'}"
    settings = [
        f"{k} {before.get(k)!r} -> {now.get(k)!r}"
        for k in embedding_shards.FINGERPRINT_KEYS
        if before.get(k) != now.get(k)
    ]
    return "; ".join(settings) or "the same settings, other vectors (re-embedded or edited in place)"


def save(workdir: str, inputs: dict) -> None:
    storage.write_json(storage.join(workdir, FILE), inputs, indent=2)


def check_embeddings(workdir: str, embeddings_dir: str, own: bool, allow: bool, purpose: str) -> list[str]:
    """For an evaluation in run `workdir`'s image-text space: `embeddings_dir` must hold vectors of the model and
    layer the run trained on (another one, `own=False`), or be the very vectors it trained on (its own). A change is
    refused unless `allow`; returns the notes results must then carry."""
    before = (recorded(workdir) or {}).get("embeddings")
    if not before:
        return []  # a run from before inputs were recorded, or one without LLM targets
    now = embedding_shards.fingerprint(embeddings_dir)
    settings = [k for k in embedding_shards.FINGERPRINT_KEYS if k != "poolings" and before.get(k) != now.get(k)]
    if own and now["sha256"] == before["sha256"] or not own and not settings:
        return []
    what = (
        describe_embeddings_change(before, now)
        if own
        else "; ".join(f"{k} {now.get(k)!r}, the run's {before.get(k)!r}" for k in settings)
    )
    if not allow:
        whose = (
            "the targets it trained on, but they changed since"
            if own
            else "report vectors, but not of the model and layer it trained on"
        )
        raise ValueError(
            f"{purpose} reads {embeddings_dir} as {workdir}'s {whose} ({what}): its image-text space "
            f"maps other vectors. Use the embeddings it trained on, or set "
            f"--config.allow_changed_inputs=True (printed in every result)"
        )
    return [f"{workdir}: {purpose} against {'changed' if own else 'other'} embeddings (allow_changed_inputs): {what}"]


def notes(workdir: str) -> list[str]:
    """What every result of the run must say: inputs that changed under it during training (allowed by
    data.allow_changed_inputs on a resume)."""
    path = storage.path(workdir) / "config_changes.json"
    history = storage.read_json(path) if path.exists() else []
    return [
        f"{workdir} resumed at step {h['resumed_at_step']} on changed inputs ({OVERRIDE}): " + "; ".join(h["inputs"])
        for h in history
        if h.get("inputs")
    ]
