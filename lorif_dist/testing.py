"""Tiny real checkpoints and data for tests, the tiny recipe and multi-process smoke runs.

`python -m lorif_dist.testing OUT` writes OUT/gpt2 and OUT/llama (random-initialized Hugging
Face architectures saved as ordinary checkpoints, with a byte-level BPE tokenizer trained
here, no download) and OUT/train.json, OUT/queries.json; configs/tiny.yaml reads them.
The Llama-style model has grouped-query attention, tied embeddings and a ChatML template;
GPT-2 has Conv1D layers and no chat template (the plain prompt/response format).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = (
    "the model learns from data and each example pushes its weights a little so attribution asks "
    "which examples pushed most a cat sat on the mat while rain fell over the quiet town and "
    "people cooked pancakes with flour eggs and milk before writing short poems about the sea"
).split()

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_records(num: int, seed: int = 0, with_input: bool = True) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        out.append(
            {
                "instruction": sentence(rng, 2, 8),
                "input": sentence(rng, 1, 4) if with_input and i % 3 == 0 else "",
                "output": sentence(rng, 2, 14),
            }
        )
    return out


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def make_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat:
        fast.chat_template = CHATML
    return fast


def make_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=256,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    # Random init is small; scale up so gradients are far from zero and differences show.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def build_checkpoint(root: Path, kind: str, seed: int = 0) -> Path:
    path = root / f"{kind}-{seed}"
    if (path / "config.json").is_file():
        return path
    tokenizer = make_tokenizer(chat=(kind == "llama"))
    model = make_model(kind, len(tokenizer), seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_inputs(out: str | Path, num_train: int = 24, num_queries: int = 3) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("gpt2", "llama"):
        path = build_checkpoint(out, kind)
        target = out / kind
        if not target.exists():
            path.rename(target)
    write_json(out / "train.json", make_records(num_train, seed=1))
    write_json(out / "queries.json", make_records(num_queries, seed=7))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lorif_dist.testing",
        description="Writes the inputs of configs/tiny.yaml: a tiny random Llama-style model, "
        "a tiny GPT-2, training and query data.",
    )
    parser.add_argument("out", nargs="?", default="runs/tiny", help="folder (default runs/tiny)")
    print(write_tiny_inputs(parser.parse_args().out))
