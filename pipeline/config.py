"""The run config: one YAML file describes a run. Validated on load with clear, key-naming errors."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.models import is_weights_file, min_input_size

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A run config is invalid; the message names the key and what is allowed."""


def absolute_local(uri: str | None) -> str | None:
    """Local paths made absolute: Ray workers (Ray Train's especially) run in other directories."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Left out of the hashes that key completion and resume (section_hash): settings that change how the
    # work is scheduled, not what it produces; and settings added after runs were made, while they keep
    # the value those runs had (so that those runs keep their keys and their finished work).
    _unhashed: ClassVar[frozenset[str]] = frozenset()
    _hashed_unless: ClassVar[dict[str, Any]] = {}


class SourceConfig(_Section):
    uri: str | None = Field(
        None, description="Dataset root (food101, imagefolder) or list file (urllist); any fsspec URI."
    )
    kind: Literal["auto", "food101", "imagefolder", "urllist", "search"] = Field(
        "auto",
        description="Layout of the source; auto detects meta/train.txt, list files, else ImageFolder. "
        "search: image search per class (classes, provider, per_class).",
    )
    name: str | None = Field(None, description="Name recorded in the images manifest; default: the kind.")
    classes: list[str] = Field(default_factory=list, description="search: the class names.")
    provider: Literal["brave", "google", "serpapi"] = Field("brave", description="search: the search API.")
    per_class: int = Field(100, ge=1, description="search: image URLs wanted per class.")
    query_suffix: str = Field("", description='search: appended to each class name, e.g. "food".')
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict, description="search: more queries per class, e.g. {pho: [pho soup]}."
    )

    _absolute_uri = field_validator("uri")(lambda v: absolute_local(v))

    @field_validator("classes")
    @classmethod
    def _classes_are_folders(cls, v: list[str]) -> list[str]:
        from pipeline.names import (
            label_problem,  # a class that cannot be a folder would only be refused later
        )

        bad = [f"{c!r} ({problem})" for c in v if (problem := label_problem(c))]
        if bad:
            raise ValueError(f"class names become folders under OUT: {', '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> SourceConfig:
        if self.kind == "search":
            if not self.classes:
                raise ValueError("a search source needs classes: [name, ...]")
            if self.uri:
                raise ValueError("a search source takes classes, not uri")
        elif not self.uri:
            raise ValueError(f"a {self.kind} source needs uri")
        return self

    @property
    def label(self) -> str:
        """The source's name in manifests."""
        return self.name or (f"search-{self.provider}" if self.kind == "search" else self.kind)


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Cluster address; default: RAY_ADDRESS, else a local instance."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs for a local instance (ignored, with a warning, when one already runs)."
    )
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local instance (likewise).")
    stall_timeout: float = Field(
        600.0,
        ge=0,
        description="Seconds a stage may wait for resources no node has free, with nothing else moving, "
        "before a warning names what waits and what the nodes have free; 0: off.",
    )
    stall_fail: bool = Field(
        False, description="After that warning, end the run (exit 1) instead of waiting."
    )


class NormalizeConfig(_Section):
    _unhashed: ClassVar[frozenset[str]] = frozenset({"task_cpus"})
    _hashed_unless: ClassVar[dict[str, Any]] = {"resample": "lanczos"}

    min_side: int = Field(64, ge=1, description="Reject images whose short side is below this (after EXIF).")
    max_pixels: int = Field(50_000_000, ge=1, description="Reject larger images as decompression bombs.")
    max_bytes: int = Field(
        64 * 2**20, ge=1, description="Reject files larger than this without reading them whole."
    )
    target_side: int = Field(256, ge=8, description="Resize so that the chosen side has this length.")
    resize_side: Literal["short", "long"] = Field("short", description="Which side target_side applies to.")
    upscale: bool = Field(False, description="Also enlarge images smaller than the target.")
    jpeg_quality: int = Field(90, ge=1, le=100, description="Quality of the re-encoded JPEG blobs.")
    shard_size: int = Field(512, ge=1, description="Images per task; also the unit of resume.")
    task_cpus: float = Field(
        1.0, ge=0.25, le=64,
        description="CPUs each normalize task asks Ray for; below 1, several tasks (processes) share a "
        "core. With downloads on an event loop, 0.5 was no faster than 1 in bench/download.py and took "
        "0.47 GiB more memory on 2 cores.",
    )  # fmt: skip
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = Field(
        "lanczos",
        description="Filter of the final resize (after a reduced-scale JPEG decode): lanczos is the "
        "sharpest; bicubic, bilinear and box cost about 10%, 17% and 22% less per image at 128 px and lose "
        "0.1-0.3, 0.6-1.6 and 1.4-3.0 dB of PSNR (bench/resample.py).",
    )  # fmt: skip


class FetchConfig(_Section):
    user_agent: str = Field(
        "cropclean/0.1 (image dataset cleaning; honours X-Robots-Tag noai)",
        description="User-Agent sent with every request.",
    )
    concurrency: int = Field(32, ge=1, description="Downloads in flight per download task (one event loop).")
    per_host: int = Field(8, ge=1, description="Concurrent requests to one host, per task.")
    per_host_delay: float = Field(
        0.0, ge=0, description="Seconds between request starts to one host, per task."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect.")
    read_timeout: float = Field(10.0, gt=0, description="Seconds without data before a read times out.")
    deadline: float = Field(
        30.0, gt=0, description="Seconds per URL in all, retries included; time queued per host not counted."
    )
    retries: int = Field(2, ge=0, description="Retries within a run on 429, 5xx and timeouts.")
    backoff: float = Field(0.5, ge=0, description="Base of the exponential backoff, seconds (plus jitter).")
    max_retry_after: float = Field(20.0, ge=0, description="Longest Retry-After honoured, seconds.")
    max_redirects: int = Field(5, ge=0, description="Redirects followed per URL.")
    max_bytes: int = Field(20 * 2**20, ge=1, description="Largest body accepted, after decompression.")
    honor_robots: bool = Field(True, description="Skip images whose X-Robots-Tag says noai or noimageai.")
    guard: bool = Field(True, description="Refuse private, loopback, link-local and metadata addresses.")
    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs the guard lets through (tests on loopback, intranets)."
    )
    max_attempts: int = Field(3, ge=1, description="Runs in which a failing URL is tried before it is final.")

    @model_validator(mode="after")
    def _valid_networks(self) -> FetchConfig:
        import ipaddress

        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f"fetch.allow_networks: {cidr!r} is not a CIDR such as 127.0.0.1/32"
                ) from None
        return self


class DedupeConfig(_Section):
    enabled: bool = Field(True, description="Turn duplicate grouping off (every image stays).")
    radius: int = Field(10, ge=0, le=32, description="Near duplicates: pHash Hamming distance at most this.")
    method: Literal["lsh", "exact"] = Field("lsh", description="lsh: bit-sampling tables; exact: all pairs.")
    lsh_tables: int = Field(64, ge=1, description="Number of bit-sampling hash tables.")
    lsh_bits: int = Field(17, ge=1, le=40, description="Bits sampled per table (bucket key width).")
    lsh_seed: int = Field(0, description="Seed of the sampled bit positions.")
    partitions: int = Field(
        8, ge=1, description="Bucket partitions (groupby shards); also the unit of resume."
    )
    keep: Literal["largest", "first"] = Field("largest", description="Which member of a group stays.")
    verify: bool = Field(
        True, description="Confirm every pHash candidate pair on the two normalized images before it "
        "groups them (see docs/dedupe.md); false: pHash alone.",
    )  # fmt: skip
    verify_max_diff: float = Field(
        0.35, ge=0, description="verify: the most that two images may differ where they differ most "
        "(aligned 48 px thumbnails, in units of the image's contrast) to be duplicates.",
    )  # fmt: skip


class SplitConfig(_Section):
    train: float = Field(
        0.8, ge=0, le=1, description="Share of each class for train when the source gives no split."
    )
    val: float = Field(0.1, ge=0, le=1, description="Share for val when the source gives no split.")
    test: float = Field(0.1, ge=0, le=1, description="Share for test when the source gives no split.")
    val_from_train: float = Field(
        0.1, ge=0, lt=1, description="When the source gives train/test only: share of train moved to val."
    )
    salt: str = Field("cropclean", description="Hash salt; change it to draw a different split.")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1, got {total:g}")
        return self


class BalanceConfig(_Section):
    max_per_class: int | None = Field(
        None, ge=1, description="Keep at most this many train images per class."
    )
    min_per_class: int = Field(1, ge=0, description="Drop classes with fewer usable images than this.")


ARCH_NAMES = Literal[
    "resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
    "efficientnet_lite0", "densenet121", "vgg16_bn", "inception_v3", "regnet_y_400mf", "convnext_tiny",
    "small_cnn", "small_resnet",
]  # fmt: skip


class MemberConfig(_Section):
    arch: ARCH_NAMES = Field(
        description="torchvision architecture, efficientnet_lite0 (ImageNet weights from an installed "
        "package), or small_cnn / small_resnet (ours: CPU runs, random init)."
    )
    name: str | None = Field(None, description="Member name in manifests and OUT/models/; default: the arch.")
    head: Literal["linear", "mlp"] = Field("linear", description="linear, or the paper's MLP 1024-512-C.")
    weights: str | None = Field(
        None, description="None (random init), a torchvision weights name (DEFAULT, IMAGENET1K_V1) or a file."
    )
    input_size: int | None = Field(None, ge=8, description="Training input side; default: the arch's own.")
    # Per-member training settings: a pretrained member and one from random init need different passes.
    head_epochs: int | None = Field(None, ge=0, description="Pass 1 epochs; default: train's.")
    finetune_epochs: int | None = Field(None, ge=0, description="Pass 2 epochs; default: train's.")
    lr_head: float | None = Field(None, gt=0, description="Pass 1 learning rate; default: train's.")
    lr_finetune: float | None = Field(None, gt=0, description="Pass 2 learning rate; default: train's.")
    augment_crop_min: float | None = Field(
        None, gt=0, le=1, description="Least area of its random resized crops; default: train's."
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str | None) -> str | None:
        from pipeline.names import label_problem

        if v is not None and (problem := label_problem(v)):
            raise ValueError(f"names the folder OUT/models/<name>/: {problem}")
        return v

    @field_validator("weights")
    @classmethod
    def _absolute_weights_file(cls, v: str | None) -> str | None:
        return absolute_local(v) if v and is_weights_file(v) else v

    @model_validator(mode="after")
    def _input_size(self) -> MemberConfig:
        if self.input_size is not None and self.input_size < min_input_size(self.arch):
            raise ValueError(f"input_size: {self.arch} needs at least {min_input_size(self.arch)}, "
                             f"got {self.input_size}")  # fmt: skip
        return self

    @property
    def label(self) -> str:
        return self.name or self.arch


class TrainConfig(_Section):
    _hashed_unless: ClassVar[dict[str, Any]] = {"lr_reference_batch": None, "compile": False}

    members: list[MemberConfig] = Field(
        default_factory=lambda: [MemberConfig(arch="resnet50"), MemberConfig(arch="efficientnet_b0")],
        description="The ensemble.",
    )
    batch_size: int = Field(32, ge=1)
    lr_reference_batch: int | None = Field(
        None, ge=1,
        description="When set, the learning rates (lr_head, lr_finetune, members' own) are meant for a batch "
        "of this size and scale with batch_size / lr_reference_batch (the linear scaling rule), so that a "
        "GPU can take larger batches without retuning them.",
    )  # fmt: skip
    head_epochs: int = Field(2, ge=0, description="Pass 1: head only, trunk frozen.")
    finetune_epochs: int = Field(6, ge=0, description="Pass 2: trunk unfrozen, lower learning rate.")
    lr_head: float = Field(1e-3, gt=0)
    lr_finetune: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning rate over each pass's epochs: cosine decay to zero, or constant."
    )
    unfreeze: Literal["all", "blocks"] = Field(
        "all", description="Pass 2 unfreezes all, or a block per epoch."
    )
    patience: int = Field(
        3, ge=1, description="Stop pass 2 after this many epochs without a better val score (select_by)."
    )
    select_by: Literal["top1", "loss"] = Field(
        "top1", description="The val number that picks a model's weights: top-1 (ties: lower loss), or loss."
    )
    augment_flip: bool = True
    augment_crop_min: float = Field(
        0.6, gt=0, le=1, description="Random resized crops keep this much area or more."
    )
    augment_color: float = Field(0.2, ge=0, description="Colour jitter strength (0: off).")
    folds: int = Field(0, ge=0, description="Cross-fitting: K fold models per member (0: off; else K >= 2).")
    crop_models: Literal["full", "folds"] = Field("full", description="Which models crop: full-data or fold.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers per member (data parallel).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each Ray Train worker reserves; torch uses as many threads (at least 1)."
    )
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="auto: GPUs when the cluster has any.")
    gpus_per_worker: float = Field(
        1.0, gt=0, le=1, description="GPU share each Ray Train worker reserves (0.5: two trainings per GPU)."
    )
    concurrent_members: int | None = Field(None, ge=1, description="Trainings at once; default: what fits.")
    max_failures: int = Field(
        3, ge=0, description="Worker failures a training survives (resumes from checkpoint)."
    )
    compile: bool = Field(
        False,
        description="Train and validate through torch.compile (inductor): faster steps once compiled, at "
        "the cost of compiling each model first (docs/training.md has the numbers).",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _folds(self) -> TrainConfig:
        if self.folds == 1:
            raise ValueError("train.folds: 0 turns cross-fitting off; otherwise at least 2")
        if self.crop_models == "folds" and not self.folds:
            raise ValueError("train.crop_models: folds needs train.folds >= 2")
        names = [m.label for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"train.members: names must be unique, got {names}; set name")
        return self


class CropConfig(_Section):
    method: Literal["fcn_ensemble", "gradcam", "similarnet"] = Field(
        "fcn_ensemble",
        description="Localizer whose crops make the cropped dataset: the convolutionalized ensemble (the "
        "method), Grad-CAM or SIMILARnet of the members.",
    )
    mode: Literal["cell", "region"] = Field(
        "cell",
        description="cell: the best window of the pyramid (the paper's crop); region: that window grown to "
        "the centres of the connected cells that find the class as well (the object as a whole, not a "
        "detail).",
    )
    scale_factor: float = Field(1.2, gt=1, description="Pyramid step: each window is this much smaller.")
    max_scale: float = Field(
        3.0, gt=0, description="Largest scale factor: smallest window = reference window / max_scale."
    )
    early_stop: bool = Field(False, description="Stop at the first scale where all members find it.")
    display_aspect: list[float] | None = Field(
        None,
        description="Display crop: [min, max] of width / height, e.g. [0.5, 2.0] (GAIC); null: none.",
    )
    display_min_area: float = Field(
        0.0, ge=0, le=1, description="Display crop: at least this share of the image's area."
    )
    baselines: list[Literal["centre", "gradcam", "similarnet", "none"]] = Field(
        default_factory=list,
        description="Other localizers also run, for evaluation (rows with their method in crops.parquet).",
    )
    batch_size: int = Field(16, ge=1, description="Images per batch of an actor (grouped by size).")
    actors: int | None = Field(
        None, ge=1, description="Actors in the pool; default: as many as the cluster's GPUs (else CPUs) hold."
    )
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs each actor reserves; torch uses as many threads."
    )
    gpus_per_actor: float = Field(
        1.0, gt=0, le=1, description="GPU share of each actor on a GPU cluster (fractions share one)."
    )
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="auto: GPUs when the cluster has any.")
    export: bool = Field(True, description="Write the cropped dataset under OUT/cropped/<split>/<class>/.")
    jpeg_quality: int = Field(90, ge=1, le=100, description="Quality of the cropped JPEGs.")

    @field_validator("display_aspect")
    @classmethod
    def _aspect_pair(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or not 0 < v[0] <= 1 <= v[1]):
            raise ValueError(f"crop.display_aspect: [min, max] with 0 < min <= 1 <= max, got {v}")
        return v


class BlacklistConfig(_Section):
    operating_point: Literal["noise_rate", "precision", "votes"] = Field(
        "noise_rate",
        description="How many of the images ranked by estimated probability of a wrong label go to "
        "annotators: noise_rate, the estimated number of wrong labels; precision, the most whose expected "
        "precision reaches target_precision; votes, the paper's rule (max_votes, min_score) and conflicting "
        "duplicates. docs/cropping.md says how each is estimated.",
    )
    target_precision: float = Field(
        0.8, gt=0, le=1, description="operating_point precision: the least expected precision of the list."
    )
    max_votes: int = Field(
        0, ge=0, description="label_not_found: the label's best votes over all scales are at most this "
        "(operating_point votes: the rule itself).",
    )  # fmt: skip
    min_score: float = Field(
        -1.0, ge=-1, le=1, description="operating_point votes: ... and suggested minus label evidence at "
        "their best cells is at least this.",
    )  # fmt: skip
    cross_label_duplicates: bool = Field(
        True, description="A copy under another label counts as evidence: the copies share one true class."
    )
    min_lift: float = Field(
        0.2, ge=-1, le=1, description="Withhold the blacklist from annotators when the weakest judging "
        "ensemble's members' val top-1 lift over chance, (top1 - 1/C) / (1 - 1/C), is below this.",
    )  # fmt: skip
    ok_lift: float = Field(
        0.6, ge=-1, le=1, description="Below this lift (at least min_lift): low confidence, marked for "
        "annotators.",
    )  # fmt: skip
    ok_agreement: float = Field(
        0.6, ge=-1, le=1, description="Low confidence when the members of the weakest judging ensemble agree "
        "less than this: mean pairwise Cohen's kappa of their predictions on images they never trained on.",
    )  # fmt: skip
    verified: str | None = Field(
        None, description="verified_train.tsv (Food-101N format) to report precision/recall against."
    )

    _absolute_verified = field_validator("verified")(lambda v: absolute_local(v))

    @model_validator(mode="after")
    def _ordered_gates(self) -> BlacklistConfig:
        for low, high in (("min_lift", "ok_lift"),):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"blacklist.{low} ({getattr(self, low)}) must not exceed blacklist.{high} "
                                 f"({getattr(self, high)})")  # fmt: skip
        return self


class EvaluateConfig(_Section):
    member: MemberConfig = Field(
        default_factory=lambda: MemberConfig(arch="resnet18", name="outside"),
        description="Classifier outside the ensemble (Table IV): an architecture no member has.",
    )
    epochs: int | None = Field(None, ge=1, description="Its training epochs; default: train.finetune_epochs.")
    augment_crop_min: float | None = Field(
        None, gt=0, le=1, description="Its random resized crops' least area; default: train.augment_crop_min."
    )
    # Loss, not top-1: over a few dozen val images top-1 moves in steps of several points, and an early,
    # near-chance epoch can win it (docs/cropping.md); the loss sees every image's probability.
    select_by: Literal["top1", "loss"] = Field(
        "loss", description="The val number that picks its weights (and the retrained one's): loss or top-1."
    )
    retrain: bool = Field(True, description="Also train it on the cropped, de-blacklisted train split.")
    cleanlab: bool = Field(True, description="Compare the blacklist with cleanlab's find_label_issues.")


class RunConfig(_Section):
    out: str = Field(description="Output URI of the run (local path, s3://...).")
    sources: list[SourceConfig] = Field(min_length=1, description="Where the images come from (one or more).")
    ray: RayConfig = Field(RayConfig(), description="Which Ray cluster runs the stages.")
    fetch: FetchConfig = Field(FetchConfig(), description="Downloading http(s) URLs.")
    normalize: NormalizeConfig = Field(NormalizeConfig(), description="Decoding, validation and resizing.")
    dedupe: DedupeConfig = Field(DedupeConfig(), description="Exact and near duplicate grouping.")
    split: SplitConfig = Field(SplitConfig(), description="Train/val/test assignment.")
    balance: BalanceConfig = Field(BalanceConfig(), description="Per-class caps and minimums.")
    train: TrainConfig = Field(TrainConfig(), description="Fine-tuning the ensemble.")
    crop: CropConfig = Field(CropConfig(), description="Point-of-interest crops.")
    blacklist: BlacklistConfig = Field(BlacklistConfig(), description="Mislabel candidates for annotators.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="Table IV evaluation, baselines.")

    _absolute_out = field_validator("out")(lambda v: absolute_local(v))

    @model_validator(mode="after")
    def _unique_source_names(self) -> RunConfig:
        names = [s.label for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: names must be unique, repeated: {dupes}; set sources[i].name")
        return self

    def section_hash(self, *sections: str) -> str:
        """A short hash of the named config sections: what a stage's completion depends on."""
        doc = {s: _dump(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _dump(value: Any) -> Any:
    if isinstance(value, _Section):
        doc = value.model_dump(mode="json", exclude=set(value._unhashed))
        return {k: v for k, v in doc.items() if value._hashed_unless.get(k, object()) != v}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- loading


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(presets())}")
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_set(doc: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (``5``, ``true``, ``[a, b]``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. dedupe.radius=8")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value is not valid YAML: {_yaml_problem(exc)}") from exc
    parts = key.strip().split(".")
    doc = json.loads(json.dumps(doc))  # deep copy of plain data
    node: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {key}: {'.'.join(parts[:i])} has {len(node)} items; {part!r} is no index"
                )
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return doc


def build_config(
    doc: dict[str, Any] | None = None,
    *,
    preset: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Defaults, then the preset (argument or the document's ``preset:`` key), the document, --set."""
    doc = dict(doc or {})
    preset = preset or doc.pop("preset", None)
    merged = deep_merge(load_preset(preset), doc) if preset else doc
    for assignment in sets:
        merged = apply_set(merged, assignment)
    return validate_config(merged)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def load_config_file(uri: str) -> dict[str, Any]:
    """The document of a run config file. ConfigError, one line, when it is missing, a folder, not
    UTF-8 text, not YAML, or not a mapping; PermissionError when it may not be read."""
    from pipeline import storage

    try:
        doc = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{uri}: not valid YAML: {_yaml_problem(exc)}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"{uri}: no such config file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{uri}: a folder, not a config file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{uri}: not a config file (not UTF-8 text)") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{uri}: a run config is a mapping of sections, got {type(doc).__name__}")
    return doc


def validate_config(doc: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


# ------------------------------------------------------------------------------------------ error text

_TYPE_NAMES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (for listing allowed keys)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(config)"
        etype = err["type"]
        if etype == "extra_forbidden":
            model = _model_at(loc)
            allowed = sorted(model.model_fields) if model else []
            key = str(loc[-1])
            hint = difflib.get_close_matches(key, allowed, n=1)
            msg = f"unknown key {where!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            msg += f"; allowed keys here: {', '.join(allowed)}"
        elif etype == "missing":
            msg = f"{where}: required key is missing"
        elif etype == "literal_error":
            expected = err["msg"].replace("Input should be", "expected")
            msg = f"{where}: {err['input']!r} is not allowed; {expected}"
        elif etype in _TYPE_NAMES:
            got = err["input"]
            msg = f"{where}: expected {_TYPE_NAMES[etype]}, got {got!r} ({type(got).__name__})"
        else:
            msg = f"{where}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else "")
        lines.append(msg)
    return "invalid run config: " + "; ".join(lines)  # one line: what a command prints


# ------------------------------------------------------------------------------------------- reference


def _type_text(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        inner = args[0]
        return "list of " + (
            "sections" if isinstance(inner, type) and issubclass(inner, BaseModel) else _type_text(inner)
        )
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    if args and type(None) in args:
        return " or ".join(_type_text(a) for a in args if a is not type(None)) + " or null"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """docs/config.md: every section and key with its type, default and meaning (generated)."""
    lines = [
        "# Run config reference",
        "",
        "Generated from `pipeline/config.py` by `python -m pipeline.config > docs/config.md`.",
        "",
    ]

    def describe(model: type[BaseModel], prefix: str) -> None:
        lines.extend(
            [
                f"## `{prefix.rstrip('.')}`" if prefix else "## Top level",
                "",
                "| key | type | default | meaning |",
                "|---|---|---|---|",
            ]
        )
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = get_args(ann)[0] if get_origin(ann) is list else ann
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                nested.append((inner, f"{prefix}{name}{'[]' if inner is not ann else ''}."))
            value = field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else f"`{json.dumps(_dump(value))}`"
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                default = "see below"
            lines.append(f"| `{name}` | {_type_text(ann)} | {default} | {field.description or ''} |")
        lines.append("")
        for sub, path in nested:
            describe(sub, path)

    describe(RunConfig, "")
    lines.append(f"Presets (`--preset NAME`, files in `pipeline/presets/`): {', '.join(presets())}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
