"""The `lorif` command (also `python -m lorif_dist`): one subcommand per stage.

    lorif extract   --config R.yaml [--section.field VALUE ...]
    lorif curvature --config R.yaml [...]
    lorif query     --config R.yaml [...]
    lorif run       --config R.yaml [...]     extract, curvature and query in one process
    lorif demo      [--limit N] [--prepare-only] [--section.field VALUE ...]
    lorif inspect   INDEX [--verify] [--json]   stages, shards, examples, bytes, next step
    lorif plan      --model CONFIG.json --num-examples N [...]   storage, memory, time
    lorif evaluate tailpatch --config R.yaml [...]   top-k vs random-k vs bottom-k steps
    lorif evaluate lds       --config R.yaml [...]   linear datamodeling score (retrains)

Any config field can be overridden as `--section.field VALUE`, e.g.
`--extract.projection_factor 16 --run.index_dir /scratch/idx`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lorif_dist.config import Config, ConfigError, config_yaml, load_config
from lorif_dist.logging_utils import logger, setup_logging
from lorif_dist.safe_io import DiskFullError

STAGES = ("extract", "curvature", "query", "run")


def _stage_parser(name: str, sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", "-c", help="YAML recipe (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorif",
        description="LoRIF training-data attribution: extract, curvature, query.",
        epilog="Override any config field with --section.field VALUE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser("extract", sub, "per-example projected gradients -> rank-c factor shards")
    _stage_parser("curvature", sub, "distributed randomized SVD of each layer's G^T G")
    _stage_parser("query", sub, "score queries against the index and write the top-k")
    _stage_parser("run", sub, "extract, curvature and query in one go")
    demo = sub.add_parser(
        "demo", help="real-model demo: SmolLM2-135M-Instruct on Alpaca + identity data"
    )
    demo.add_argument(
        "--limit", type=int, default=None, help="use only the first N Alpaca examples"
    )
    demo.add_argument(
        "--prepare-only", action="store_true", help="fetch and convert the inputs, then stop"
    )
    demo.add_argument(
        "--workdir", default=None, help="where the demo index goes (default runs/demo)"
    )
    demo.add_argument("--top", type=int, default=5, help="proponents to print per query")
    insp = sub.add_parser(
        "inspect", help="what an index holds, what is missing, and what to run next"
    )
    insp.add_argument("index", help="the index directory (run.index_dir)")
    insp.add_argument(
        "--verify", action="store_true", help="also hash every shard against the manifest"
    )
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    from lorif_dist.plan_cli import add_plan_arguments

    add_plan_arguments(sub)
    evaluate = sub.add_parser(
        "evaluate",
        help="attribution quality of the saved scores: tail-patch or LDS",
        description="attribution quality of the saved scores: tail-patch or LDS",
    )
    evaluate.add_argument("metric", choices=("tailpatch", "lds"))
    evaluate.add_argument("--config", "-c", help="YAML recipe (see configs/)")
    evaluate.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def run_evaluate(metric: str, cfg: Config) -> dict:
    from lorif_dist.distributed import init_runtime

    runtime = init_runtime(cfg.model.device, cfg.run.backend, cfg.run.task_id, cfg.run.num_tasks)
    setup_logging(runtime.rank)
    if metric == "lds":
        from lorif_dist.evaluate.lds import run_lds

        return run_lds(cfg, runtime=runtime)
    from lorif_dist.evaluate.tailpatch import run_tailpatch

    return run_tailpatch(cfg) if runtime.is_main else {}


def run_stage(command: str, cfg: Config) -> dict:
    from lorif_dist.distributed import init_runtime

    runtime = init_runtime(cfg.model.device, cfg.run.backend, cfg.run.task_id, cfg.run.num_tasks)
    setup_logging(runtime.rank)
    if runtime.is_main:
        logger.info("config: %s", json.dumps(cfg.to_dict(), default=str))
    out: dict = {}
    extractor = None
    if command in ("extract", "run"):
        from lorif_dist.extract import GradientExtractor, run_extract

        extractor = GradientExtractor(cfg, runtime)
        out["extract"] = run_extract(cfg, runtime, extractor)
    if command in ("curvature", "run"):
        from lorif_dist.curvature import run_curvature

        out["curvature"] = run_curvature(cfg, runtime)
    if command in ("query", "run"):
        from lorif_dist.query import run_query

        out["query"] = run_query(cfg, runtime, extractor)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    try:
        if args.command == "inspect":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            from lorif_dist.inspection import run_inspect

            run_inspect(args.index, verify=args.verify, as_json=args.json)
            return 0
        if args.command == "plan":
            from lorif_dist.plan_cli import run_plan_command

            run_plan_command(args, rest)
            return 0
        if args.command == "demo":
            from lorif_dist.config import parse_overrides
            from lorif_dist.demo import run_demo

            parse_overrides(rest)  # a malformed override fails before minutes of work
            run_demo(args.limit, args.prepare_only, args.workdir, args.top, overrides=rest)
            return _exit(0)
        cfg = load_config(args.config, rest)
        if args.print_config:
            print(config_yaml(cfg))
            return 0
        if args.command == "evaluate":
            run_evaluate(args.metric, cfg)
        else:
            run_stage(args.command, cfg)
    except (ConfigError, ValueError, FileNotFoundError, DiskFullError) as e:
        logger.error("error: %s", e)
        return _exit(2)
    return _exit(0)


def _exit(code: int) -> int:
    """Leaves the process group cleanly; gloo can abort in interpreter teardown otherwise."""
    from lorif_dist.distributed import shutdown

    shutdown()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
