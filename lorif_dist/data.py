"""Examples: loading, tokenization with response-only labels, and token-budget batching.

An example is a prompt and a response. Only response tokens carry loss; prompt and padding
tokens get label -100. Records come in two formats:

    alpaca    {"instruction": ..., "input": ..., "output": ..., ["system": ...]}
    messages  {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}

With a chat template, every assistant turn of a `messages` record carries loss. Text is
tokenized segment by segment (prompt, response, ...) so the label boundary is exact.
Example ids are row positions over the train files in the order given; they never change
when examples are skipped, sorted, split across tasks and ranks, or batched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Example:
    """One tokenized example; `labels` is -100 outside response tokens."""

    example_id: int
    input_ids: list[int]
    labels: list[int]
    prompt: str
    response: str

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeReport:
    """What tokenization dropped or cut, for the stage summary and the manifest."""

    num_records: int = 0
    num_truncated: int = 0
    skipped: dict[int, str] = field(default_factory=dict)  # example id -> reason


# ---------------------------------------------------------------------------------------
# Reading records.


def read_records(
    files: Sequence[str], limit: int | None = None, field: str = "data.train_files"
) -> list[dict[str, Any]]:
    """Reads json / jsonl / parquet files through `datasets`, concatenated in order.

    `field` is the config field the files came from, named in errors.
    """
    import datasets

    if not files:
        raise ValueError(f"no data files given: set {field} to json, jsonl or parquet files")
    records: list[dict[str, Any]] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise FileNotFoundError(f"{field}: data file {name!r} not found{where}")
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"{field}: data file {name!r}: expected a .json, .jsonl or .parquet file, "
                f"got suffix {path.suffix!r}"
            )
        if kind == "json" and path.stat().st_size < 64 and path.read_text().strip() in ("", "[]"):
            continue  # an empty file: `datasets` cannot infer a schema from nothing
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(
                kind, data_files=str(path), split="train", keep_in_memory=True
            )
        except Exception as e:  # datasets raises many types for malformed files
            raise ValueError(f"data file {name!r} could not be read as {kind}: {e}") from e
        records.extend(ds.to_list())
        if limit is not None and len(records) >= limit:
            return records[:limit]
    return records


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise ValueError(
        "cannot tell the record format: expected keys 'instruction' and 'output' (alpaca) "
        f"or 'messages' (chat); found keys {sorted(record)}"
    )


def _fill(text: str, template_vars: dict[str, str]) -> str:
    for key, value in template_vars.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def to_messages(
    record: dict[str, Any], fmt: str, system_prompt: str | None, template_vars: dict[str, str]
) -> list[dict[str, str]]:
    """Normalizes a record to a list of chat messages ending with an assistant turn."""
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "alpaca":
        user = str(record.get("instruction") or "")
        extra = record.get("input")
        if extra:
            user = f"{user}\n\n{extra}" if user else str(extra)
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": str(record.get("output") or "")},
        ]
        system = record.get("system") or system_prompt
    else:
        raw = record.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"expected a non-empty list under 'messages', got {raw!r}")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in raw]
        system = system_prompt if messages[0]["role"] != "system" else None
    if system:
        messages = [{"role": "system", "content": str(system)}] + messages
    return [{"role": m["role"], "content": _fill(m["content"], template_vars)} for m in messages]


# ---------------------------------------------------------------------------------------
# Tokenization.


def _segments(tokenizer: Any, messages: list[dict[str, str]], use_template: bool):
    """Yields (text, carries_loss) pieces whose concatenation is the rendered example."""
    if use_template:
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ValueError(
                    "the tokenizer's chat template does not render conversations as growing "
                    "prefixes, so response tokens cannot be located; set data.chat_template: "
                    "false to use the plain prompt/response format"
                )
            yield prefix[len(done) :], False
            yield full[len(prefix) :], True
            done = full
        return
    prompt = "\n\n".join(m["content"] for m in messages[:-1] if m["content"]) + "\n"
    if tokenizer.bos_token:
        prompt = tokenizer.bos_token + prompt
    yield prompt, False
    yield messages[-1]["content"] + (tokenizer.eos_token or ""), True


def tokenize_example(
    tokenizer: Any,
    example_id: int,
    messages: list[dict[str, str]],
    max_length: int,
    use_template: bool,
) -> tuple[Example, bool]:
    """Tokenizes one example; returns it and whether truncation cut tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_parts: list[str] = []
    response_parts: list[str] = []
    for text, carries_loss in _segments(tokenizer, messages, use_template):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if carries_loss else [IGNORE_INDEX] * len(ids))
        (response_parts if carries_loss else prompt_parts).append(text)
    truncated = len(input_ids) > max_length
    example = Example(
        example_id=example_id,
        input_ids=input_ids[:max_length],
        labels=labels[:max_length],
        prompt="\n".join(m["content"] for m in messages[:-1] if m["role"] != "system"),
        response=messages[-1]["content"],
    )
    return example, truncated


def load_examples(
    tokenizer: Any,
    files: Sequence[str],
    fmt: str = "auto",
    max_length: int = 512,
    chat_template: bool = True,
    system_prompt: str | None = None,
    template_vars: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[list[Example], TokenizeReport]:
    """Reads and tokenizes examples; empty or fully truncated responses are skipped."""
    records = read_records(files, limit)
    if not records:
        raise ValueError(f"no examples found in {list(files)}: the files are empty")
    return tokenize_records(
        tokenizer, records, fmt, max_length, chat_template, system_prompt, template_vars
    )


def tokenize_records(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    fmt: str = "auto",
    max_length: int = 512,
    chat_template: bool = True,
    system_prompt: str | None = None,
    template_vars: dict[str, str] | None = None,
) -> tuple[list[Example], TokenizeReport]:
    """Tokenizes records (ids are their positions); see `load_examples`."""
    use_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
    report = TokenizeReport(num_records=len(records))
    examples = []
    for example_id, record in enumerate(records):
        try:
            messages = to_messages(record, fmt, system_prompt, template_vars or {})
        except (KeyError, ValueError) as e:
            raise ValueError(f"example {example_id}: {e}") from e
        if messages[-1]["role"] != "assistant":
            report.skipped[example_id] = "last message is not an assistant turn"
            continue
        if not messages[-1]["content"].strip():
            report.skipped[example_id] = "empty response"
            continue
        example, truncated = tokenize_example(
            tokenizer, example_id, messages, max_length, use_template
        )
        report.num_truncated += int(truncated)
        # A label at position 0 predicts nothing (labels are shifted), so it cannot count.
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            report.skipped[example_id] = "response fully truncated by data.max_length"
            continue
        examples.append(example)
    if not examples:
        reasons = sorted(set(report.skipped.values()))
        raise ValueError(
            f"all {len(records)} examples were skipped ({'; '.join(reasons)}); nothing to attribute"
        )
    return examples, report


def fingerprint(examples: Sequence[Example]) -> str:
    """Hash of the tokenized examples: covers data, tokenizer, template and max_length."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.example_id, ex.input_ids, ex.labels]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Batching.


def token_budget_batches(
    examples: Sequence[Example], batch_tokens: int, max_batch_size: int
) -> list[list[Example]]:
    """Groups examples, longest first, so each padded batch stays within `batch_tokens`.

    Length-sorting keeps padding small; longest first surfaces out-of-memory errors in the
    first batch rather than hours into a run. The grouping depends only on the examples
    given, so a rerun of the same shard rebuilds the same batches (needed for a resume
    that is bit-identical to an uninterrupted run).
    """
    order = sorted(examples, key=lambda ex: (-ex.num_tokens, ex.example_id))
    batches: list[list[Example]] = []
    current: list[Example] = []
    for ex in order:
        width = current[0].num_tokens if current else ex.num_tokens
        if current and (
            (len(current) + 1) * width > batch_tokens or len(current) >= max_batch_size
        ):
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    return batches


def collate(
    batch: Sequence[Example], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pads a batch; position ids follow the attention mask so left padding is harmless."""
    width = max(ex.num_tokens for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = ex.num_tokens
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[i, cols] = torch.tensor(ex.input_ids)
        labels[i, cols] = torch.tensor(ex.labels)
        mask[i, cols] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": position_ids,
    }


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
