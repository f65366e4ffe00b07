"""Tiny corpora and tokenizers made on the fly."""

import json
from pathlib import Path

from mellama_jax.data.tokenizer import Tokenizer

WORDS = {
    "biomedical": "insulin glucose kinase receptor antibody tumour protein gene metformin statin".split(),
    "clinical": "patient admitted discharge fever cough pain vitals plan follow up".split(),
    "general": "the river city train book garden music table window morning".split(),
}


def write_corpus(directory: Path, name: str, docs: int, rng, min_words=3, max_words=60) -> Path:
    path = directory / f"{name}.jsonl"
    words = WORDS[name]
    with open(path, "w") as f:
        for _ in range(docs):
            n = int(rng.integers(min_words, max_words))
            f.write(json.dumps({"text": " ".join(rng.choice(words, n))}) + "\n")
    return path


def tiny_tokenizer(directory: Path) -> Path:
    texts = [" ".join(words) for words in WORDS.values()] * 20
    return Tokenizer.train(texts, vocab_size=300).save(directory)
