"""``cropclean``: the command line. Thin: parse, build a config, call the pipeline."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from pipeline.config import ConfigError, RunConfig, build_config, load_config_file, presets
from pipeline.crawl.providers import ProviderError

# 2: the user's input is wrong (a path, a kind, a config) and the one line says what to change.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
        clutter=args.clutter, backgrounds=args.backgrounds, object_scale=args.object_scale,
    )  # fmt: skip
    print(f"wrote {s.n_files} files in {len(s.classes)} classes to {s.root}")
    for kind, n in sorted(s.counts.items()):
        print(f"  {kind:20s} {n}")
    return EXIT_OK


def _check_sources(cfg: RunConfig) -> None:
    """Each source with a path is there and of its kind (else SourceError), and OUT is no file (else
    ConfigError): checked before OUT is written or Ray starts."""
    from pipeline import storage
    from pipeline.sources import check_source

    fs, path = storage.get_fs(cfg.out)
    if fs.isfile(path):
        raise ConfigError(f"{cfg.out}: a file; --out names the folder of the run")
    for src in cfg.sources:
        if src.uri is not None and src.kind != "search":
            check_source(src.uri, src.kind)


def _run_ingest(cfg: RunConfig) -> int:
    return _run_pipeline(cfg, "ingest")


def _print_stage_notes(report: Any) -> None:
    """Per stage, the errors it met and the work it left for a later run."""
    if report.skipped:
        print(f"resumed: stages already complete and skipped: {', '.join(report.skipped)}")
    for name, result in report.results.items():
        for error in result.errors:
            print(f"warning: {name}: {error}", file=sys.stderr)
        if result.incomplete:
            left = result.retry_later or "some"
            print(f"note: {name} left {left} items for a later run; run the same command again to continue",
                  file=sys.stderr)  # fmt: skip


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
    from pipeline.layout import RunLayout

    run_yaml = RunLayout(args.out).run_config
    if not storage.exists(run_yaml):
        print(f"cropclean {command}: {args.out} holds no run (no run.yaml); run cropclean ingest first",
              file=sys.stderr)  # fmt: skip
        return None
    return _config_from_args(args, load_config_file(run_yaml))


def _print_training(report: Any, cfg: RunConfig) -> None:
    from pipeline.layout import RunLayout

    layout = RunLayout(cfg.out)
    for member, numbers in report.results["train"].stats.get("members", {}).items():
        print(f"{member:24s} val top-1 {numbers['val_top1']:.3f}  top-5 {numbers['val_top5']:.3f}")
    print(f"models: {layout.models}/  predictions: {layout.manifest('predictions')}")


def _print_crop(report: Any, cfg: RunConfig) -> None:
    stats = report.results["crop"].stats
    flagged = ", ".join(f"{n} {r}" for r, n in stats.get("blacklisted", {}).items()) or "none"
    print(f"crops: {stats['exported']} images cropped under {cfg.out}/cropped/ "
          f"(mean side {stats['mean_side']} px); {stats['too_small']} too small for the pyramid")  # fmt: skip
    print(f"blacklist: {flagged} -> {cfg.out}/manifests/blacklist.parquet")
    ranking = stats.get("blacklist") or {}
    if ranking:
        gate = ranking.get("confidence") or {}
        decision = gate.get("decision", "?")
        rate = ranking.get("noise_rate")
        estimate = (f"estimated noise rate {100 * rate:.1f}% ({ranking['allowed']} of {ranking['images']})"
                    if rate is not None else "noise rate not estimated (no cross-fitting)")  # fmt: skip
        print(f"  ranked by estimated probability of a wrong label; operating point "
              f"{ranking['operating_point']}, {estimate}; confidence {decision}")  # fmt: skip
        if gate.get("decision") not in (None, "ok"):
            print(f"warning: {gate.get('message', '')}", file=sys.stderr)
    if "export" in report.results:
        from pipeline.annotate import export

        written = report.results["export"].stats
        for line in report.results["export"].errors:
            print(f"warning: export: {line}", file=sys.stderr)
        if written.get("refused"):
            print(f"annotator files not written: the blacklist is withheld (cropclean export {cfg.out} "
                  f"--force writes them anyway)")  # fmt: skip
            return
        folder = f"{cfg.out}/export"
        print(f"for annotators: {folder}/{export.BLACKLIST_TASKS} (Label Studio, with {export.CONFIG}), "
              f"{folder}/{export.BLACKLIST_CSV}; answers back with: cropclean verdicts import FILE "
              f"--out {cfg.out}")  # fmt: skip
        if written.get("reviewed"):
            print(f"  {written['reviewed']} blacklisted images left out: they already have a verdict")


def _print_evaluation(cfg: RunConfig) -> None:
    from pipeline.evaluation.classify import format_evaluation, read_evaluation_metrics
    from pipeline.evaluation.quality import format_quality

    metrics = read_evaluation_metrics(cfg.out)
    print(format_evaluation(metrics))
    quality = format_quality(metrics.get("quality") or {})
    if quality:
        print(quality)


def _run_after_ingest(args: argparse.Namespace, last: str) -> int:
    """``cropclean train|crop|evaluate OUT``: run the pipeline of that name on an ingested run."""
    from pipeline.pipelines import run_pipeline

    cfg = _ingested_config(args, last)
    if cfg is None:
        return EXIT_USAGE
    report = run_pipeline(cfg, last)
    if last == "train":
        _print_training(report, cfg)
    elif last == "crop":
        _print_crop(report, cfg)
    else:
        _print_evaluation(cfg)
    _print_logs(cfg)
    return EXIT_OK


def _print_logs(cfg: RunConfig) -> None:
    """Where Ray's own log lines of the run went (they are kept off the console), when this run
    started Ray and routed them (``runner.ensure_ray``)."""
    import os

    from pipeline.layout import RunLayout
    from pipeline.runner import ray_session_logs

    log_file = RunLayout(cfg.out).ray_log
    if not os.path.exists(log_file.removeprefix("file://")):
        return
    session = ray_session_logs()
    workers = f"; its workers' output: {session}" if session else ""
    print(f"Ray's log: {log_file}{workers}")


def _run_pipeline(cfg: RunConfig, name: str) -> int:
    """Run pipeline ``name`` (``pipeline.pipelines``): the ingest first, with its summary, then the rest
    with what each part produced, the stages' table and where the logs are."""
    from pipeline.ingest import run_ingest
    from pipeline.pipelines import run_pipeline
    from pipeline.progress import stage_table
    from pipeline.summary import format_ingest_summary

    _check_sources(cfg)
    ingested, summary = run_ingest(cfg)
    print(format_ingest_summary(summary, cfg.out))
    _print_stage_notes(ingested)
    if name == "ingest":
        _print_logs(cfg)
        return EXIT_OK
    report = run_pipeline(cfg, name)
    _print_training(report, cfg)
    if "crop" in report.results:
        _print_crop(report, cfg)
    if "evaluate" in report.results:
        _print_evaluation(cfg)
    # The ingest stages ran in the first call; the second only found them complete.
    print(stage_table({**report.results, **{n: r for n, r in ingested.results.items() if not r.skipped}}))
    if "report" in report.results:
        print(f"report: {report.results['report'].stats['index']}")
    _print_logs(cfg)
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    """Everything: ingest, train, crop and blacklist, evaluate, the report."""
    doc = load_config_file(args.config) if args.config else {}
    if args.source:
        doc["sources"] = [{"uri": args.source, **({"kind": args.kind} if args.kind else {})}]
    elif not doc.get("sources"):
        print("cropclean clean: give a SOURCE, or a --config that names sources", file=sys.stderr)
        return EXIT_USAGE
    if not args.out and not doc.get("out"):
        print("cropclean clean: give --out, or a --config that names out", file=sys.stderr)
        return EXIT_USAGE
    return _run_pipeline(_config_from_args(args, doc), "clean")


def cmd_report(args: argparse.Namespace) -> int:
    """``cropclean report OUT``: (re)build the HTML report of a run from its manifests."""
    from pipeline.report import build_report

    try:
        result = build_report(args.out, per_page=args.per_page, heatmap_limit=args.heatmaps)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cropclean report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report: {result.index} ({result.pages} pages, {result.thumbnails} new thumbnails, "
          f"{result.heatmaps} images run for heatmaps, {result.seconds:.1f} s)")  # fmt: skip
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Write the annotator files of a cropped run again (e.g. with other image URLs)."""
    from pipeline import manifests, storage
    from pipeline.annotate.export import local_files_prefix, write_blacklist_export
    from pipeline.layout import RunLayout

    layout = RunLayout(args.out)
    needed = [layout.manifest("blacklist"), layout.classes]
    missing = [u for u in needed if not storage.exists(u)]
    if missing:
        print(f"cropclean export: {args.out} has no {', '.join(missing)}; run cropclean crop first",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    prefix = args.image_prefix
    if args.document_root is not None:
        try:
            prefix = local_files_prefix(args.out, args.document_root)
        except ValueError as exc:
            print(f"cropclean export: {exc}", file=sys.stderr)
            return EXIT_USAGE
    classes = manifests.read_classes(layout.classes)
    written = write_blacklist_export(args.out, classes, prefix, force=args.force)
    for line in written["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if written["refused"]:
        print(f"cropclean export: {written['message']}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{written['rows']} blacklisted images for annotators:")
    for uri in written["files"].values():
        print(f"  {uri}")
    if written["reviewed"]:
        print(f"{written['reviewed']} blacklisted images left out: they already have a verdict "
              f"({args.out}/manifests/overrides.parquet)")  # fmt: skip
    return EXIT_OK


def cmd_verdicts_import(args: argparse.Namespace) -> int:
    import os

    from pipeline.annotate.labelstudio import LabelStudioError, user_emails
    from pipeline.annotate.review import format_review
    from pipeline.annotate.verdicts import VerdictError, import_verdicts, overrides_uri

    users = None
    if args.labelstudio_url:
        token = args.labelstudio_token or os.environ.get("LABEL_STUDIO_API_KEY", "")
        if not token:
            print("cropclean verdicts import: --labelstudio-url needs a token: --labelstudio-token or "
                  "LABEL_STUDIO_API_KEY (Label Studio: Account & Settings, Personal Access Token)",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        try:
            users = user_emails(args.labelstudio_url, token)
        except LabelStudioError as exc:
            print(f"cropclean verdicts import: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        done = import_verdicts(args.file, args.out, replace=args.replace, users=users,
                               target_precision=args.precision)  # fmt: skip
    except VerdictError as exc:  # a bad file or run folder: one line (several when rows are named)
        print(f"cropclean verdicts import: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the overrides manifest could not be written: nothing changed
        print(f"cropclean verdicts import: {overrides_uri(args.out)}: not written: {exc}", file=sys.stderr)
        return EXIT_FAILED
    counts = done.overrides["verdict"].value_counts().to_dict()
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("keep", "relabel", "drop"))
    open_rows = f"{done.unanswered} {'row' if done.unanswered == 1 else 'rows'} without a verdict left out"
    print(f"imported {done.added} verdicts from {args.file} (read as {done.kind})"
          + (f"; {open_rows}" if done.unanswered else ""))  # fmt: skip
    print(f"{overrides_uri(args.out)}: {summary}")
    print(format_review(done.precision or {}))
    print(f"the next run on {args.out} applies them (cropclean clean ... --out {args.out}, or cropclean crop "
          f"{args.out}); cropclean report {args.out} shows the precision")  # fmt: skip
    return EXIT_OK


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _scale_range(text: str) -> tuple[float, float]:
    """LOW,HIGH with 0 < LOW <= HIGH <= 1, e.g. 0.333,0.5."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want LOW,HIGH, e.g. 0.333,0.5; got {text}") from None
    if not 0 < low <= high <= 1:
        raise argparse.ArgumentTypeError(f"want 0 < LOW <= HIGH <= 1, got {text}")
    return low, high


def cmd_predict(args: argparse.Namespace) -> int:
    """Pre-labelling: ingest unlabelled images into OUT2 and label them with the ensemble of run --models."""
    from pipeline import manifests, storage
    from pipeline.config import absolute_local
    from pipeline.layout import RunLayout

    trained = RunLayout(args.models)
    if not storage.exists(trained.run_config) or not storage.exists(trained.classes):
        print(f"cropclean predict: {args.models} holds no trained run (no run.yaml or models/classes.json); "
              "run cropclean train there first", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:  # another run's file: refused with its reason before anything starts
        manifests.read_classes(trained.classes)
    except manifests.ManifestError as exc:
        print(f"cropclean predict: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if absolute_local(args.out.rstrip("/")) == absolute_local(args.models.rstrip("/")):
        print("cropclean predict: --out must be a folder of its own, not the trained run's", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.pipelines import predict_stages
    from pipeline.runner import run_stages
    from pipeline.stages.predict import PRELABEL_CSV, PRELABEL_TASKS

    doc = load_config_file(trained.run_config)
    doc["sources"] = [{"uri": args.source, **({"kind": args.kind} if args.kind else {})}]
    cfg = _config_from_args(args, doc)
    _check_sources(cfg)
    report = run_stages(cfg, predict_stages(args.models, args.threshold, args.image_prefix))
    stats = report.results["predict"].stats
    print(
        f"prelabels: {stats['images']} images, {stats['unsure']} unsure (confidence below "
        f"{stats['threshold']:g} or members disagree) -> {cfg.out}/manifests/prelabels.parquet"
    )
    print(f"for annotators: {cfg.out}/export/{PRELABEL_TASKS} (Label Studio, predictions pre-filled), "
          f"{cfg.out}/export/{PRELABEL_CSV}")  # fmt: skip
    return EXIT_OK


def _config_from_file(args: argparse.Namespace) -> RunConfig:
    """The config of the file ``args.config``; its errors name the file."""
    doc = load_config_file(args.config)
    try:
        return _config_from_args(args, doc)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """``cropclean run CONFIG``: the pipeline the config asks for (``pipelines.pipeline_for``)."""
    from pipeline.pipelines import pipeline_for

    doc = load_config_file(args.config)
    return _run_pipeline(_config_from_file(args), pipeline_for(doc))


def cmd_stage(args: argparse.Namespace) -> int:
    """``cropclean stage NAME OUT``: one stage, again, on a run whose earlier stages are complete."""
    import json

    from pipeline.pipelines import run_one_stage

    cfg = _ingested_config(args, "stage")
    if cfg is None:
        return EXIT_USAGE
    report = run_one_stage(cfg, args.name)
    result = report.results[args.name]
    _print_stage_notes(report)
    print(f"{args.name}: {json.dumps(result.stats, default=str)}")
    _print_logs(cfg)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config_from_file(args)
    print(f"{args.config}: valid")
    if args.show:
        print(cfg.to_yaml())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cropclean", description="Clean image datasets at scale on Ray.")
    verbose_help = "log each stage; on an error, print its traceback too"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # -v after the command too (cropclean ingest SRC --out OUT -v; python -m jobs.ingest ... -v). SUPPRESS:
    # a command's parser that did not see -v must not reset the value the main parser read.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)

    def command(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[verbose], **kwargs)

    sub = parser.add_subparsers(dest="command", required=True)

    p = command(sub, "synth", help="write a generated Food-101-layout dataset with ground truth")
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--noise", type=float, default=0.1, help="label-flip rate in train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clutter", type=float, default=1.0, help="background busyness: 1 default, 0 a plain gradient "
        "(with --backgrounds real: the decoy objects on the photo, 0 none)"
    )  # fmt: skip
    p.add_argument("--backgrounds", choices=["synthetic", "real"], default="synthetic",
                   help="generated clutter, or crops of photographs bundled with scikit-learn and "
                   "scikit-image (needs scikit-image)")  # fmt: skip
    p.add_argument("--object-scale", type=_scale_range, metavar="LOW,HIGH",
                   help="object side as a share of the short side (default 0.18,0.40; 0.333,0.5 with "
                   "--backgrounds real)")  # fmt: skip
    p.set_defaults(func=cmd_synth)

    p = command(sub, "ingest", help="read, validate, normalize, dedupe and split a dataset")
    p.add_argument("source", help="Food-101 root, ImageFolder root or URL list (any fsspec URI)")
    p.add_argument("--out", required=True, help="output URI of the run")
    p.add_argument(
        "--kind", choices=["food101", "imagefolder", "urllist"], help="source kind (default: detect)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = command(sub, "crawl", help="search images per class (or take a URL list), download, clean, split")
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

    p = command(sub, "train", help="fine-tune the ensemble on an ingested run (reads OUT's manifests)")
    p.add_argument("out", help="output URI of an ingested run")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _run_after_ingest(a, "train"))

    p = command(sub, "crop", help="crop an ingested, trained run and write its blacklist (reads OUT)")
    p.add_argument("out", help="output URI of an ingested run (trains first if needed)")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _run_after_ingest(a, "crop"))

    p = command(
        sub, "evaluate", help="the paper's evaluation (Table IV) and quality numbers of a cropped run"
    )
    p.add_argument("out", help="output URI of an ingested run (trains and crops first if needed)")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _run_after_ingest(a, "evaluate"))

    p = command(sub, "clean", help="everything: ingest, train, crop and blacklist, evaluate")
    p.add_argument(
        "source", nargs="?", help="Food-101 root, ImageFolder root or URL list (any fsspec URI); "
        "default: the sources of --config"
    )  # fmt: skip
    p.add_argument("--out", help="output URI of the run (default: the out of --config)")
    p.add_argument("--config", help="a run config file (local path or any fsspec URI, e.g. s3://...)")
    p.add_argument(
        "--kind", choices=["food101", "imagefolder", "urllist"], help="source kind (default: detect)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_clean)

    p = command(sub, "report", help="build the HTML report of a run (OUT/report/index.html)")
    p.add_argument("out", help="output URI of a run")
    p.add_argument("--per-page", type=int, default=100, help="images per gallery and review page")
    p.add_argument("--heatmaps", type=int, default=400,
                   help="gallery images with a heatmap overlay (blacklisted: all)")  # fmt: skip
    p.set_defaults(func=cmd_report)

    from pipeline.annotate.export import DEFAULT_IMAGE_PREFIX

    prefix_help = (f"what goes before an image's path (relative to the run folder) in Label Studio tasks; "
                   f"default {DEFAULT_IMAGE_PREFIX!r} (Label Studio local files with the run folder as "
                   f"document root); e.g. http://host:8000/ for a served run folder")  # fmt: skip
    p = command(sub, "export", help="write a cropped run's annotator files again (OUT/export/)")
    p.add_argument("out", help="output URI of a cropped run")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--image-prefix", default=DEFAULT_IMAGE_PREFIX, help=prefix_help)
    where.add_argument("--document-root", metavar="DIR",
                       help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, a folder at or above "
                       "OUT: the image URLs become its local-files URLs (docs/annotators.md)")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="write the files even for a blacklist the weak-ensemble gate withheld, and every row "
                   "of one longer than the run's estimated number of wrong labels")  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = command(sub, "verdicts", help="annotators' verdicts on the blacklist")
    verbs = p.add_subparsers(dest="verdicts_command", required=True)
    v = command(verbs, "import", help="read a verdict CSV or a Label Studio export into OUT's overrides")
    v.add_argument("file", help="CSV or TSV (image_id, verdict keep|relabel|drop, new_label), or Label "
                   "Studio's JSON, JSON-MIN, CSV or TSV export")  # fmt: skip
    v.add_argument("--out", required=True, help="output URI of the run the verdicts are about")
    v.add_argument("--replace", action="store_true", help="forget the run's earlier verdicts")
    v.add_argument("--labelstudio-url", metavar="URL",
                   help="Label Studio's address: annotators are stored by email, not user id")  # fmt: skip
    v.add_argument("--labelstudio-token", metavar="TOKEN",
                   help="its access token (default: $LABEL_STUDIO_API_KEY)")  # fmt: skip
    v.add_argument("--precision", type=_threshold, default=0.9,
                   help="the blacklist precision whose score threshold is reported (0.9)")  # fmt: skip
    v.set_defaults(func=cmd_verdicts_import)

    p = command(sub, "predict", help="pre-label unlabelled images with a trained run's ensemble")
    p.add_argument("source", help="a folder of images (no class folders) or a URL list without labels")
    p.add_argument("--models", required=True, help="output URI of a trained run (its models/ are used)")
    p.add_argument("--out", required=True, help="output URI for this run")
    p.add_argument("--threshold", type=_threshold, default=0.99,
                   help="confidence below this marks a prediction unsure (default 0.99)")  # fmt: skip
    p.add_argument("--kind", choices=["imagefolder", "urllist"], help="source kind (default: detect)")
    p.add_argument("--image-prefix", default=DEFAULT_IMAGE_PREFIX, help=prefix_help)
    _add_config_args(p)
    p.set_defaults(func=cmd_predict)

    p = command(
        sub,
        "run",
        help="run what a config file asks for: ingest, and train, crop (with "
        "blacklist) or evaluate (everything, with the report) when it has those sections",
    )
    p.add_argument("config")
    p.add_argument("--out", help="override the config's output URI")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    from pipeline.pipelines import PIPELINES

    p = command(sub, "stage", help="run one stage again on a run whose earlier stages are complete")
    p.add_argument("name", choices=PIPELINES["clean"], help="the stage")
    p.add_argument("out", help="output URI of the run")
    _add_config_args(p)
    p.set_defaults(func=cmd_stage)

    p = command(sub, "validate", help="check a config file and exit")
    p.add_argument("config")
    p.add_argument("--out", help="override the config's output URI")
    p.add_argument("--show", action="store_true", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)
    return parser


# OS errors about a path the user named or can fix: missing, a file for a folder (or the reverse), no
# permission, a read-only place, a name too long. Others (a full disk, an I/O error) are failures.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_USER_ERRNOS = frozenset({errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP})


def _unwrapped(exc: BaseException) -> BaseException:
    """The error a Ray task raised, rather than Ray's wrapper with the remote traceback in its text."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # not imported: nothing ran on Ray
    wrapper = getattr(ray_exceptions, "RayTaskError", None)
    while wrapper is not None and isinstance(exc, wrapper) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to change: exit 2. Modules not yet imported cannot have
    raised theirs (and importing them here would cost seconds: torch)."""
    from pipeline.names import UnsafeName
    from pipeline.sources import SourceError
    from pipeline.storage import UnsafePath

    types: list[type[BaseException]] = [ConfigError, SourceError, UnsafePath, UnsafeName]
    zoo = sys.modules.get("pipeline.models.zoo")
    if zoo is not None:
        types.append(zoo.ModelError)  # a weights file or checkpoint that cannot be used
    return tuple(types)


def _os_error_text(exc: OSError) -> str:
    if exc.strerror:  # "[Errno 13] Permission denied: '/x'" -> "/x: permission denied"
        why = exc.strerror[:1].lower() + exc.strerror[1:]
        return f"{exc.filename}: {why}" if exc.filename is not None else why
    plain = {
        FileNotFoundError: "no such file or folder",
        PermissionError: "permission denied",
        IsADirectoryError: "a folder, where a file is needed",
        NotADirectoryError: "not a folder",
    }.get(type(exc))
    if plain and len(exc.args) == 1:  # fsspec's remote filesystems: FileNotFoundError(path)
        return f"{exc.args[0]}: {plain}"
    return str(exc) or type(exc).__name__


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def describe_error(exc: BaseException) -> tuple[int, str]:
    """The exit code for ``exc`` and the one line that says what went wrong (without "cropclean: ")."""
    exc = _unwrapped(exc)
    if isinstance(exc, _user_error_types()):
        return EXIT_USAGE, _one_line(str(exc))
    if isinstance(exc, ProviderError):  # no key, bad key: nothing was searched
        return EXIT_FAILED, _one_line(str(exc))
    if isinstance(exc, OSError):
        user = isinstance(exc, _USER_OS_ERRORS) or exc.errno in _USER_ERRNOS
        return (EXIT_USAGE if user else EXIT_FAILED), _one_line(_os_error_text(exc))
    text = _one_line(str(exc))
    return EXIT_FAILED, f"internal error: {type(exc).__name__}" + (f": {text}" if text else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 1 failed; 2 the input is wrong (a path, a kind, a config: the
    one line on stderr says what); 130 interrupted. ``-v`` adds the traceback of an error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the user knows why; a finished stage stays finished
        print("cropclean: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code, text = describe_error(exc)
        if args.verbose:
            traceback.print_exc()
        elif text.startswith("internal error"):
            text += " (run with -v for the traceback)"
        print(f"cropclean: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
