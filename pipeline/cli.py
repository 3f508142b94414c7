"""``cropclean``: the command line. Thin: parse, build a config, call the pipeline."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.config import ConfigError, RunConfig, build_config, load_config_file, presets
from pipeline.crawl.providers import ProviderError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"named settings: {', '.join(presets())}")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set dedupe.radius=8 (repeatable)",
    )


def _config_from_args(args: argparse.Namespace, doc: dict[str, Any]) -> RunConfig:
    if getattr(args, "out", None):
        doc["out"] = args.out
    return build_config(doc, preset=args.preset, sets=args.sets)


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import synthesize

    s = synthesize(
        args.out, classes=args.classes, per_class=args.per_class, noise=args.noise, seed=args.seed,
        clutter=args.clutter,
    )  # fmt: skip
    print(f"wrote {s.n_files} files in {len(s.classes)} classes to {s.root}")
    for kind, n in sorted(s.counts.items()):
        print(f"  {kind:20s} {n}")
    return EXIT_OK


def _run_ingest(cfg: RunConfig) -> int:
    from pipeline.ingest import run_ingest
    from pipeline.summary import format_ingest_summary

    report, summary = run_ingest(cfg)
    if report.skipped:
        print(f"resumed: stages already complete and skipped: {', '.join(report.skipped)}")
    print(format_ingest_summary(summary, cfg.out))
    for name, result in report.results.items():
        for error in result.stats.get("errors", []):
            print(f"warning: {name}: {error}", file=sys.stderr)
        if result.stats.get("incomplete"):
            left = result.stats.get("retry_later", "some")
            print(f"note: {name} left {left} items for a later run; run the same command again to continue",
                  file=sys.stderr)  # fmt: skip
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    source = {"uri": args.source}
    if args.kind:
        source["kind"] = args.kind
    return _run_ingest(_config_from_args(args, {"sources": [source]}))


def cmd_crawl(args: argparse.Namespace) -> int:
    if bool(args.classes) == bool(args.urls):
        print("cropclean crawl: give either --classes (with --provider) or --urls", file=sys.stderr)
        return EXIT_USAGE
    if args.urls:
        source: dict[str, Any] = {"uri": args.urls, "kind": "urllist"}
    else:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        source = {
            "kind": "search",
            "classes": classes,
            "provider": args.provider,
            "per_class": args.per_class,
        }
        if args.query_suffix:
            source["query_suffix"] = args.query_suffix
    doc: dict[str, Any] = {"sources": [source]}
    if args.allow_network:
        doc["fetch"] = {"allow_networks": args.allow_network}
    return _run_ingest(_config_from_args(args, doc))


def _ingested_config(args: argparse.Namespace, command: str) -> RunConfig | None:
    """The config of the ingested run at ``args.out`` (its run.yaml), with this command's --set applied."""
    from pipeline import storage

    run_yaml = storage.join(args.out, "run.yaml")
    if not storage.exists(run_yaml):
        print(f"cropclean {command}: {args.out} holds no run (no run.yaml); run cropclean ingest first",
              file=sys.stderr)  # fmt: skip
        return None
    return _config_from_args(args, load_config_file(run_yaml))


def _print_training(report: Any, cfg: RunConfig) -> None:
    from pipeline import storage

    for member, numbers in report.results["train"].stats.get("members", {}).items():
        print(f"{member:24s} val top-1 {numbers['val_top1']:.3f}  top-5 {numbers['val_top5']:.3f}")
    print(f"models: {storage.join(cfg.out, 'models')}/  predictions: {cfg.out}/manifests/predictions.parquet")


def _print_crop(report: Any, cfg: RunConfig) -> None:
    stats = report.results["crop"].stats
    flagged = ", ".join(f"{n} {r}" for r, n in stats.get("blacklisted", {}).items()) or "none"
    print(f"crops: {stats['exported']} images cropped under {cfg.out}/cropped/ "
          f"(mean side {stats['mean_side']} px); {stats['too_small']} too small for the pyramid")  # fmt: skip
    print(f"blacklist: {flagged} -> {cfg.out}/manifests/blacklist.parquet")


def _print_evaluation(cfg: RunConfig) -> None:
    from pipeline.evaluation.classify import format_evaluation, read_evaluation_metrics
    from pipeline.evaluation.quality import format_quality

    metrics = read_evaluation_metrics(cfg.out)
    print(format_evaluation(metrics))
    quality = format_quality(metrics.get("quality") or {})
    if quality:
        print(quality)


def _stages_through(last: str) -> list[Any]:
    """The pipeline's stages, ingest first, up to and including ``last`` (train, crop or evaluate)."""
    from pipeline.ingest import ingest_stages
    from pipeline.stages.crop import CropStage
    from pipeline.stages.evaluate import EvaluateStage
    from pipeline.stages.train import TrainStage

    later = [TrainStage(), CropStage(), EvaluateStage()]
    names = [stage.name for stage in later]
    return [*ingest_stages(), *later[: names.index(last) + 1]]


def _run_after_ingest(args: argparse.Namespace, last: str) -> int:
    """``cropclean train|crop|evaluate OUT``: run the stages up to ``last`` on an ingested run."""
    from pipeline.runner import run_stages

    cfg = _ingested_config(args, last)
    if cfg is None:
        return EXIT_USAGE
    report = run_stages(cfg, _stages_through(last))
    if last == "train":
        _print_training(report, cfg)
    elif last == "crop":
        _print_crop(report, cfg)
    else:
        _print_evaluation(cfg)
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    """Everything: ingest, train, crop and blacklist, evaluate."""
    from pipeline.ingest import run_ingest
    from pipeline.runner import run_stages
    from pipeline.summary import format_ingest_summary

    source = {"uri": args.source, **({"kind": args.kind} if args.kind else {})}
    cfg = _config_from_args(args, {"sources": [source]})
    report, summary = run_ingest(cfg)
    print(format_ingest_summary(summary, cfg.out))
    report = run_stages(cfg, _stages_through("evaluate"))
    _print_training(report, cfg)
    _print_crop(report, cfg)
    _print_evaluation(cfg)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    return _run_ingest(_config_from_args(args, load_config_file(args.config)))


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args, load_config_file(args.config))
    print(f"{args.config}: valid")
    if args.show:
        print(cfg.to_yaml())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cropclean", description="Clean image datasets at scale on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a generated Food-101-layout dataset with ground truth")
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--noise", type=float, default=0.1, help="label-flip rate in train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clutter", type=float, default=1.0, help="background busyness: 1 default, 0 a plain gradient"
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="read, validate, normalize, dedupe and split a dataset")
    p.add_argument("source", help="Food-101 root, ImageFolder root or URL list (any fsspec URI)")
    p.add_argument("--out", required=True, help="output URI of the run")
    p.add_argument(
        "--kind", choices=["food101", "imagefolder", "urllist"], help="source kind (default: detect)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("crawl", help="search images per class (or take a URL list), download, clean, split")
    p.add_argument("--classes", help='comma-separated class names, e.g. "ramen,pho"')
    p.add_argument("--provider", choices=["brave", "google", "serpapi"], default="brave")
    p.add_argument("--per-class", type=int, default=100, help="image URLs wanted per class")
    p.add_argument("--query-suffix", default="", help='appended to each query, e.g. "food"')
    p.add_argument("--urls", help="a URL list (CSV/TSV/Parquet/TXT with url[,label]) instead of a search")
    p.add_argument("--out", required=True, help="output URI of the run")
    p.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                   help="let downloads reach this private range (repeatable), e.g. 127.0.0.1/32")  # fmt: skip
    _add_config_args(p)
    p.set_defaults(func=cmd_crawl)

    p = sub.add_parser("train", help="fine-tune the ensemble on an ingested run (reads OUT's manifests)")
    p.add_argument("out", help="output URI of an ingested run")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _run_after_ingest(a, "train"))

    p = sub.add_parser("crop", help="crop an ingested, trained run and write its blacklist (reads OUT)")
    p.add_argument("out", help="output URI of an ingested run (trains first if needed)")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _run_after_ingest(a, "crop"))

    p = sub.add_parser(
        "evaluate", help="the paper's evaluation (Table IV) and quality numbers of a cropped run"
    )
    p.add_argument("out", help="output URI of an ingested run (trains and crops first if needed)")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _run_after_ingest(a, "evaluate"))

    p = sub.add_parser("clean", help="everything: ingest, train, crop and blacklist, evaluate")
    p.add_argument("source", help="Food-101 root, ImageFolder root or URL list (any fsspec URI)")
    p.add_argument("--out", required=True, help="output URI of the run")
    p.add_argument(
        "--kind", choices=["food101", "imagefolder", "urllist"], help="source kind (default: detect)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("run", help="run the pipeline described by a config file")
    p.add_argument("config")
    p.add_argument("--out", help="override the config's output URI")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config file and exit")
    p.add_argument("config")
    p.add_argument("--out", help="override the config's output URI")
    p.add_argument("--show", action="store_true", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"cropclean: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProviderError as exc:  # no key, bad key: nothing was searched
        print(f"cropclean: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
