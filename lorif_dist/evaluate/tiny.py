"""The tiny LDS recipe: a small Llama-style model on real chit-chat, all from PyPI.

    python -m lorif_dist.evaluate.tiny [--out runs/lds-tiny]

prepares everything configs/lds-tiny.yaml reads:

    data      the wheel `chitchat-dataset==0.9.0` (BYU PCC lab's Chit-Chat Challenge, MIT
              licence) carries 7,168 real two-person conversations, each opened on one of
              35 topic prompts. An example is one turn (prompt) and the reply (response),
              both 3 to 20 words. Topics are split: the SFT topics give the attributed
              training set (train.json) and the held-out queries (queries.json, from other
              conversations on the same topics); the remaining topics give pretrain.json.
    tokenizer a byte-level BPE (1,024 tokens) trained here on the pretraining text; examples
              use the plain format ("prompt\n" + response + end of text), no chat template
    base      a Llama-style model (3 blocks, width 96, 0.43M parameters) from a fixed
              random init, pretrained on 12,800 examples of pretrain.json (400 steps of 32):
              the `train.init` of the recipe
    final     base fine-tuned on train.json by the recipe's `train` section (seed
              train.seed): the model the index attributes (model.name_or_path)

LDS then retrains base on half-size subsets of train.json by the same recipe. Splitting by
topic keeps the queries' topics out of pretraining, so the SFT examples are the model's only
text on them; which examples a subset holds visibly moves each query's loss (a standard
deviation of 3.8 nats over the 32 subsets, on about 110 nats per query).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorif_dist.logging_utils import Timer, logger, setup_logging

CHITCHAT = "chitchat-dataset==0.9.0"
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lds-tiny.yaml"
NUM_SFT_TOPICS = 8
MIN_WORDS, MAX_WORDS = 3, 20
PRETRAIN_STEPS, PRETRAIN_BATCH = 400, 32
NUM_PRETRAIN = PRETRAIN_STEPS * PRETRAIN_BATCH  # one epoch of base pretraining


def read_chitchat() -> dict[str, Any]:
    """The conversations of the chitchat-dataset wheel (installed, or fetched from PyPI)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "dataset.json"
        if path.is_file():
            return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("lds-tiny: downloading the %s wheel from PyPI", CHITCHAT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", CHITCHAT, "-d", tmp, "-q"]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("chitchat_dataset-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            return json.loads(zf.read("chitchat_dataset/dataset.json"))


def _pairs(conversation: dict[str, Any]) -> list[dict[str, str]]:
    turns = [" ".join(u["text"].strip() for u in group) for group in conversation["messages"]]
    out = []
    for prompt, response in zip(turns[:-1], turns[1:], strict=False):
        if all(MIN_WORDS <= len(t.split()) <= MAX_WORDS for t in (prompt, response)):
            out.append({"instruction": prompt, "input": "", "output": response})
    return out


def split_records(
    conversations: dict[str, Any], num_train: int, num_queries: int, seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """pretrain / train / queries records; deterministic in (data, sizes, seed)."""
    rng = np.random.default_rng(seed)
    by_topic: dict[str, list[str]] = {}
    for cid in sorted(conversations):
        topic = conversations[cid].get("prompt") or ""
        by_topic.setdefault(topic, []).append(cid)
    topics = sorted(t for t in by_topic if t)
    sft_topics = set(rng.choice(topics, size=NUM_SFT_TOPICS, replace=False).tolist())
    pretrain, train, queries = [], [], []
    per_topic_train = -(-num_train // NUM_SFT_TOPICS)
    per_topic_queries = -(-num_queries // NUM_SFT_TOPICS)
    for topic in sorted(by_topic):
        cids = [by_topic[topic][i] for i in rng.permutation(len(by_topic[topic]))]
        if topic not in sft_topics:
            pretrain.extend(p for cid in cids for p in _pairs(conversations[cid]))
            continue
        # Openers ("hi, how are you?") say nothing of the topic: start at the third turn.
        # Each query comes from its own conversation, which no training example comes from.
        topic_queries, topic_train = [], []
        for cid in cids:
            pairs = _pairs(conversations[cid])[2:]
            if not pairs:
                continue
            if len(topic_queries) < per_topic_queries:
                topic_queries.append(pairs[int(rng.integers(len(pairs)))])
            elif len(topic_train) < per_topic_train:
                topic_train.extend(pairs[:3])
        queries.extend(topic_queries)
        train.extend(topic_train[:per_topic_train])
    order = rng.permutation(len(train))
    pretrain = [pretrain[i] for i in rng.permutation(len(pretrain))[:NUM_PRETRAIN]]
    return {
        "pretrain": pretrain,
        "train": [train[i] for i in order][:num_train],
        "queries": queries[:num_queries],
    }


def make_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return fast


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _train_on(cfg, model, tokenizer, files: list[Path], train_cfg, seed: int) -> list[float]:
    from lorif_dist.data import load_examples
    from lorif_dist.evaluate.training import train_model

    d = cfg.data
    examples, _ = load_examples(
        tokenizer, [str(f) for f in files], d.format, d.max_length, d.chat_template
    )
    return train_model(
        model,
        examples,
        train_cfg,
        tokenizer.pad_token_id,
        seed,
        log_every=max(train_cfg.steps // 6, 1),
    )


def prepare(out: str | Path, config: str | Path = TINY_CONFIG) -> Path:
    """Writes data, tokenizer, base and final checkpoints under `out` (skips what exists)."""
    import dataclasses

    from lorif_dist.config import load_config

    timer = Timer()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config)
    files = {name: out / f"{name}.json" for name in ("pretrain", "train", "queries")}
    if not all(f.is_file() for f in files.values()):
        records = split_records(read_chitchat(), num_train=512, num_queries=48)
        for name, f in files.items():
            f.write_text(json.dumps(records[name]))
        logger.info("lds-tiny: %s", {k: len(v) for k, v in records.items()})

    base, final = out / "base", out / "final"
    if not (base / "config.json").is_file():
        # The tokenizer sees the pretraining text only, as a base model's would.
        pretrain = json.loads(files["pretrain"].read_text())
        tokenizer = make_tokenizer([r["instruction"] + " " + r["output"] for r in pretrain])
        model = make_model(len(tokenizer), seed=0)
        # Pretraining: the recipe's optimizer, longer and at a larger batch, on other topics.
        pre = dataclasses.replace(
            cfg.train,
            steps=PRETRAIN_STEPS,
            batch_size=PRETRAIN_BATCH,
            lr=3e-3,
            warmup_steps=20,
            schedule="cosine",
        )
        losses = _train_on(cfg, model, tokenizer, [files["pretrain"]], pre, seed=0)
        logger.info(
            "lds-tiny: base pretraining loss %.3f -> %.3f",
            np.mean(losses[:20]),
            np.mean(losses[-20:]),
        )
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    if not (final / "config.json").is_file():
        from lorif_dist.modeling import load_model, load_tokenizer

        tokenizer = load_tokenizer(str(base))
        model = load_model(str(base), cfg.train.dtype)
        losses = _train_on(cfg, model, tokenizer, [files["train"]], cfg.train, cfg.train.seed)
        logger.info("lds-tiny: SFT loss %.3f -> %.3f", np.mean(losses[:10]), np.mean(losses[-10:]))
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
    logger.info("lds-tiny: inputs ready in %s (%.0f s)", out, timer.seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lds-tiny", help="where the inputs go")
    parser.add_argument("--config", default=str(TINY_CONFIG), help="the recipe (its train section)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: a model this small gains nothing from a second "
        "thread and loses much when the cores are shared)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_logging()
    prepare(args.out, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
