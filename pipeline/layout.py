"""The run folder OUT: every path under it is named here, and only here.

Stages, the CLI, the report and the annotator tools ask a :class:`RunLayout` where a file lives instead
of spelling ``"models/classes.json"`` themselves, so that the layout can change in one place and a
reader finds every file of a run below::

    OUT/run.yaml                      the resolved config of the last run
    OUT/metrics.json                  numbers per stage (the runner merges each stage's section)
    OUT/manifests/<name>.parquet      the manifests (schemas in schemas/<name>.yaml)
    OUT/stages/<stage>/               a stage's own files: _COMPLETE.json, shards, ledgers
    OUT/blobs/<ab>/<sha256>.jpg       normalized images, content-addressed
    OUT/cache/search/                 search providers' answers
    OUT/models/classes.json           the class names, in label-index order
    OUT/models/<member>[/fold-<k>]/   a trained model: weights, history, predictions
    OUT/models/_evaluate/<name>/      the evaluation's own models (Table IV)
    OUT/models/_ray/                  Ray Train's run folders (checkpoints)
    OUT/cropped/<split>/<class>/      the cropped dataset
    OUT/export/                       files for annotators
    OUT/report/                       the HTML report
    OUT/logs/ray.log                  Ray's log lines of the run
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import storage
from pipeline.names import safe_id, safe_label, safe_split

EVALUATE_MODELS = "_evaluate"  # under models/: a name no ensemble member's folder can take by accident
TRAIN_RUNS = "_ray"
DONE_FILE = "_COMPLETE.json"  # a stage's (or a model's) completion record, with the key it finished under


def blob_path(sha256: str) -> str:
    """Where a normalized image lives, relative to OUT (content-addressed)."""
    return f"blobs/{sha256[:2]}/{sha256}.jpg"


def cropped_path(split: str, label: str, image_id: str) -> str:
    """Where an image's crop goes, relative to OUT (ImageFolder layout). The names come from the images
    manifest: one that cannot be a path segment under OUT raises UnsafeName."""
    return f"cropped/{safe_split(split)}/{safe_label(label)}/{safe_id(image_id)}.jpg"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder ``out`` (a local path or an fsspec URI)."""

    out: str

    def uri(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    # -- the run as a whole
    @property
    def run_config(self) -> str:
        return self.uri("run.yaml")

    @property
    def metrics(self) -> str:
        return self.uri("metrics.json")

    @property
    def ray_log(self) -> str:
        """The driver's Ray log lines of the run (kept off the console)."""
        return self.uri("logs", "ray.log")

    # -- manifests and the stages' own files
    def manifest(self, name: str) -> str:
        return self.uri("manifests", f"{name}.parquet")

    def stage_dir(self, stage: str) -> str:
        return self.uri("stages", stage)

    def stage_marker(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), DONE_FILE)

    @property
    def candidates(self) -> str:
        """Every input the sources yielded, refused ones included (schema ``candidates``)."""
        return storage.join(self.stage_dir("sources"), "candidates.parquet")

    @property
    def search_cache(self) -> str:
        """Search providers' answers, kept so that a stopped search resumes without asking again."""
        return self.uri("cache", "search")

    @property
    def normalized_images(self) -> str:
        """One row per candidate after fetching and normalizing (schema ``images``)."""
        return storage.join(self.stage_dir("normalize"), "images.parquet")

    @property
    def deduped_images(self) -> str:
        """The images after dedupe, before the split (schema ``images``)."""
        return storage.join(self.stage_dir("dedupe"), "images.parquet")

    @property
    def judgments(self) -> str:
        """The crop stage's per-image judgments and scores (schema ``judgments``)."""
        return storage.join(self.stage_dir("crop"), "judgments.parquet")

    # -- models
    @property
    def models(self) -> str:
        return self.uri("models")

    @property
    def classes(self) -> str:
        return self.uri("models", "classes.json")

    def model_dir(self, member: str, fold: int | None = None) -> str:
        return self.uri("models", member, *([f"fold-{fold}"] if fold is not None else []))

    def evaluation_model_dir(self, name: str) -> str:
        return self.uri("models", EVALUATE_MODELS, name)

    @property
    def train_runs(self) -> str:
        return self.uri("models", TRAIN_RUNS)

    # -- what users take away
    @property
    def cropped(self) -> str:
        return self.uri("cropped")

    @property
    def export_dir(self) -> str:
        return self.uri("export")

    @property
    def report_dir(self) -> str:
        return self.uri("report")
