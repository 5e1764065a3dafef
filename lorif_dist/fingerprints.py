"""Fingerprints of what an index depends on besides the model: its tokenizer and data files.

The manifest's identity already holds the model's fingerprint (modeling.py) and a hash of
the tokenized examples (data.py), which changes with either the data or the tokenizer. These
two name the culprit when an index is reopened or queried with something else:

    tokenizer      class, vocabulary size and a hash of everything that decides token ids:
                   the fast tokenizer's full serialization (vocabulary, merges, normalizer,
                   pre-tokenizer, added tokens), the special tokens and the chat template
    dataset_files  per training file: path as given, size and SHA-256 of its bytes. Every
                   rank of an extraction reads and tokenizes all of them anyway, which costs
                   far more than hashing them; a query needs them unchanged, because it
                   prints the training texts of the example ids it finds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorif_dist.storage import file_sha256


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary (merges are not exposed uniformly)
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "hash": h.hexdigest()[:16],
    }


def data_files_fingerprint(files: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for name in files:
        path = Path(name)
        out.append({"path": str(name), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return out
