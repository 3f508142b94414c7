"""Ensemble training on Ray Train: two passes, validation-only selection, resume after a killed worker,
out-of-fold predictions covering every train image once per member, concurrent members, and accuracy
well above chance on generated data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import manifests
from pipeline.config import ConfigError
from pipeline.faults import FaultPlan
from pipeline.ingest import ingest_stages
from pipeline.models.data import Augment, ray_dataset, training_rows
from pipeline.models.fit import DatasetCache, augment_of, concurrency, runs, worker_request
from pipeline.models.jobs import make_jobs, member_params
from pipeline.models.train_loop import (
    LoopState,
    TrainParams,
    better,
    make_optimizer,
    run_epoch,
    runner_for,
    set_trainable,
    train_batches,  # fmt: skip
)
from pipeline.models.zoo import build_model, head_parameters, trunk_parameters
from pipeline.runner import run_stages
from pipeline.stages.train import TrainStage
from tests.conftest import ingest_config

TINY = ["train.members=[{arch: resnet18, input_size: 32}]", "train.folds=0", "train.batch_size=16",
        "train.head_epochs=1", "train.finetune_epochs=2", "train.patience=5"]  # fmt: skip


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def changed(before, params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


def test_pass_one_trains_only_the_head_and_pass_two_the_trunk():
    torch.manual_seed(0)
    model = build_model("resnet18", classes=4, input_size=32)
    p = TrainParams(
        member="m", arch="resnet18", classes=4, model_dir="memory://m", head_epochs=1, finetune_epochs=1
    )
    batch = [{"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 4, (8,))}]
    bn = next(m for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))

    head0, trunk0, stats0 = (
        snapshot(head_parameters(model)),
        snapshot(trunk_parameters(model)),
        bn.running_mean.clone(),
    )
    model.train()
    opt = make_optimizer(set_trainable(model, p, epoch=0), p, epoch=0)
    run_epoch(model, batch, torch.device("cpu"), opt)
    assert changed(head0, head_parameters(model))
    assert not changed(trunk0, trunk_parameters(model))  # frozen trunk: weights ...
    assert torch.equal(stats0, bn.running_mean)  # ... and batch-norm statistics untouched

    trunk1 = snapshot(trunk_parameters(model))
    model.train()
    opt = make_optimizer(set_trainable(model, p, epoch=1), p, epoch=1)
    assert opt.param_groups[0]["lr"] == p.lr_finetune
    run_epoch(model, batch, torch.device("cpu"), opt)
    assert changed(trunk1, trunk_parameters(model))


def test_blockwise_unfreezing_opens_one_more_top_block_per_epoch():
    model = build_model("resnet18", classes=3, input_size=32)
    p = TrainParams(member="m", arch="resnet18", classes=3, model_dir="memory://m", head_epochs=1,
                    finetune_epochs=3, unfreeze="blocks")  # fmt: skip
    blocks = list(model.trunk.children())
    for epoch, open_blocks in [(0, 0), (1, 1), (2, 2), (3, 3)]:
        set_trainable(model, p, epoch)
        trainable = [any(q.requires_grad for q in b.parameters()) for b in blocks if list(b.parameters())]
        assert sum(trainable) == open_blocks and all(trainable[len(trainable) - open_blocks :])


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    data = tmp_path_factory.mktemp("train") / "data"
    synthesize(str(data), classes=3, per_class=16, noise=0.0, seed=3)
    out = data.parent / "run"
    run_stages(ingest_config(data, out), ingest_stages())
    return out


def report_key(out: Path, stage: str) -> str:
    return json.loads((out / "stages" / stage / "_COMPLETE.json").read_text())["key"]


def run_train(out: Path, *sets: str, faults: FaultPlan | None = None):
    cfg = ingest_config(out.parent / "data", out, *TINY, *sets)
    return run_stages(cfg, [*ingest_stages(), TrainStage()], faults or FaultPlan())


def test_training_selects_on_val_only_and_resumes_a_killed_worker(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    shutil.copytree(tiny_run.parent / "data", tmp_path / "data")
    # Killed in the middle of epoch 1, and again while predicting (after the last epoch, 2).
    report = run_train(out, faults=FaultPlan(kills=frozenset({("train:resnet18", 1), ("train:resnet18", 3)})))
    model_dir = out / "models" / "resnet18"
    assert (model_dir / "_killed_in_epoch_1").exists()  # the worker process really died in epoch 1 ...
    assert (model_dir / "_killed_in_epoch_3").exists()  # ... and while predicting ...
    history = json.loads((model_dir / "history.json").read_text())
    assert history["starts"] == [0, 1, 3]  # ... and each restart began where it died, not from scratch
    assert [r["epoch"] for r in history["history"]] == [0, 1, 2]
    best = max(history["history"], key=lambda r: (r["val_top1"], -r["val_loss"]))
    saved = torch.load(model_dir / "best.pt", weights_only=False)
    assert saved["epoch"] == best["epoch"]  # the kept weights are the best on val

    metrics = json.loads((out / "metrics.json").read_text())["training"]["members"]["resnet18"]
    assert metrics["val_top1"] == best["val_top1"] and 0 <= metrics["val_top5"] <= 1
    images = manifests.read_manifest("images", str(out / "manifests" / "images.parquet"))
    preds = manifests.read_manifest("predictions", str(out / "manifests" / "predictions.parquet"))
    split = preds.merge(images[["image_id", "split", "label"]], on="image_id")
    assert set(split["split"]) == {"train", "val", "test"} and split["fold"].isna().all()
    assert len(preds) == preds["image_id"].nunique() == int(images["split"].notna().sum())
    assert report.results["train"].stats["members"]["resnet18"]["val_top1"] == best["val_top1"]


def test_out_of_fold_predictions_cover_every_train_image_once_per_member(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    shutil.copytree(tiny_run.parent / "data", tmp_path / "data")
    # The member's three models train one after another in one Ray Train run, and each one's worker
    # dies once in its second epoch (batches of 4: every fold has a second batch to die in).
    kill = FaultPlan(kills=frozenset({("train:resnet18", 1)}))
    run_train(out, "train.folds=2", "train.finetune_epochs=1", "train.batch_size=4", faults=kill)
    member = out / "models" / "resnet18"
    for model_dir in (member, member / "fold-0", member / "fold-1"):
        assert (model_dir / "_killed_in_epoch_1").exists()
        # Resumed where it died; and one finished before a later model died was not trained again.
        assert json.loads((model_dir / "history.json").read_text())["starts"] == [0, 1], model_dir
    images = manifests.read_manifest("images", str(out / "manifests" / "images.parquet"))
    preds = manifests.read_manifest("predictions", str(out / "manifests" / "predictions.parquet"))
    train_ids = set(images.loc[(images["status"] == "ok") & (images["split"] == "train"), "image_id"])
    oof = preds[preds["fold"].notna()]
    assert set(oof["image_id"]) == train_ids and oof.groupby(["image_id", "member"]).size().eq(1).all()
    full = preds[preds["fold"].isna()].merge(images[["image_id", "split"]], on="image_id")
    assert set(full["split"]) == {"val", "test"}  # with folds on, train images are judged out of fold only
    assert pd.api.types.is_float_dtype(oof["label_prob"]) and oof["topk_labels"].map(len).eq(3).all()
    for fold in (0, 1):  # a fold model never trained on the images it predicts
        assert (out / "models" / "resnet18" / f"fold-{fold}" / "best.pt").exists()

    # Other settings: the stage runs again and each model retrains instead of reusing the old weights.
    # A second member, with one training at a time: both members' models go in one Ray Train run.
    two = "train.members=[{arch: resnet18, input_size: 32}, {arch: small_cnn, input_size: 32}]"
    report = run_train(out, "train.finetune_epochs=1", two, "train.concurrent_members=1")
    assert report.ran == ["train"]
    history = json.loads((out / "models" / "resnet18" / "history.json").read_text())
    assert [r["epoch"] for r in history["history"]] == [0, 1] and history["starts"] == [0]
    preds = manifests.read_manifest("predictions", str(out / "manifests" / "predictions.parquet"))
    labelled = int(images["split"].notna().sum())
    assert preds["fold"].isna().all() and preds.groupby("member").size().to_dict() == {
        "resnet18": labelled, "small_cnn": labelled}  # fmt: skip
    key = report_key(out, "train")
    runs_dir = {p.name for p in (out / "models" / "_ray").iterdir() if key in p.name}
    assert runs_dir == {f"resnet18-{key}-and-1-more"}, runs_dir


def test_training_batches_mix_the_classes_and_change_order_each_epoch(tiny_run):
    images = manifests.read_manifest("images", str(tiny_run / "manifests" / "images.parquet"))
    rows = training_rows(images, sorted(images["label"].dropna().unique()))
    rows = rows[rows["split"] == "train"].sort_values("label_idx")  # the worst case: class by class
    ds = ray_dataset(rows, str(tiny_run), 32, Augment(), batch_size=8)
    p = TrainParams(member="m", arch="resnet18", classes=3, model_dir="memory://m", batch_size=8)
    orders = []
    for epoch in (0, 1):
        batches = list(train_batches(ds.iterator(), p, epoch))
        # Decoded once as uint8 a little larger than the input; the worker augments them on its device.
        assert all(b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 37, 37) for b in batches)
        assert sorted(r for b in batches for r in b["row"].tolist()) == list(range(len(rows)))  # all, once
        assert all(b["label"].unique().numel() >= 2 for b in batches[:-1])  # every full batch mixes classes
        orders.append([r for b in batches for r in b["row"].tolist()])
    assert orders[0] != orders[1]


def test_members_train_at_once_when_the_cluster_has_room_and_one_by_one_when_not():
    cfg = ingest_config("data", "out", "train.cpus_per_worker=0.5")
    assert concurrency(cfg, 2, {"CPU": 2}, gpu=False) == 2  # two half-CPU workers, a CPU left for data
    assert concurrency(cfg, 5, {"CPU": 2}, gpu=False) == 2
    assert concurrency(cfg, 1, {"CPU": 16}, gpu=False) == 1
    whole = ingest_config("data", "out", "train.cpus_per_worker=1")
    assert concurrency(whole, 2, {"CPU": 2}, gpu=False) == 1  # no room: one after another
    assert concurrency(whole, 8, {"CPU": 16}, gpu=False) == 8
    pairs = ingest_config("data", "out", "train.num_workers=2")
    assert concurrency(pairs, 3, {"CPU": 16, "GPU": 4}, gpu=True) == 2  # two 2-GPU trainings
    shared = ingest_config("data", "out", "train.gpus_per_worker=0.25")
    assert concurrency(shared, 6, {"CPU": 16, "GPU": 1}, gpu=True) == 4  # four trainings share one GPU
    assert worker_request(shared, True).gpus == 0.25 and worker_request(shared, False).gpus == 0.0
    with pytest.raises(ConfigError, match=r"gpus_per_worker"):
        ingest_config("data", "out", "train.gpus_per_worker=2")
    three = ingest_config("data", "out", "train.concurrent_members=3", "train.cpus_per_worker=0.5")
    assert concurrency(three, 4, {"CPU": 8}, False) == 3
    assert concurrency(three, 4, {"CPU": 2}, False) == 3  # half a CPU left: the data tasks ask for half each
    # 1.5 CPUs held by workers leave nothing for the augmentation tasks: it would wait forever.
    with pytest.raises(ConfigError, match=r"train\.concurrent_members 3 .* 1\.5 CPUs"):
        concurrency(three, 4, {"CPU": 1.5}, False)


def test_models_share_one_ray_train_run_per_slot_so_start_up_is_paid_once_per_slot():
    """Three members of three models (full data and two folds) on one slot (a GPU that holds one training)
    are one Ray Train run; on two slots, two runs; a member's models stay together and in order."""
    members = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert runs(members, 1) == [[0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert runs(members, 2) == [[0, 1, 2, 6, 7, 8], [3, 4, 5]]
    assert runs(members, 3) == members and runs(members, 8) == members
    assert runs([[0], [1, 2, 3], [4]], 2) == [[1, 2, 3], [0, 4]]  # the largest first, then the emptiest run
    assert runs([], 2) == []


def test_selection_rules_keep_the_best_val_top1_or_the_least_val_loss():
    state = LoopState(best_top1=0.30, best_loss=2.0)
    sharper = {"top1": 0.28, "loss": 1.7}  # fewer right, but surer where right (a lower loss)
    luckier = {"top1": 0.32, "loss": 2.3}  # one image more right, the rest near chance
    assert better(sharper, state, "loss") and not better(sharper, state, "top1")
    assert better(luckier, state, "top1") and not better(luckier, state, "loss")
    assert better({"top1": 0.30, "loss": 1.9}, state, "top1")  # top-1 ties: the lower loss wins
    assert better({"top1": 0.31, "loss": 2.0}, state, "loss")  # loss ties: the higher top-1 wins
    assert better({"top1": 0.0, "loss": 9.9}, LoopState(), "loss")  # the first epoch is always kept


def test_a_member_s_own_passes_and_augmentation_override_the_train_section():
    cfg = ingest_config(
        "data", "out", "train.head_epochs=0", "train.finetune_epochs=10", "train.lr_finetune=0.003",
        "train.members=[{arch: efficientnet_lite0, weights: DEFAULT, input_size: 64, head_epochs: 3, "
        "lr_head: 0.01, lr_finetune: 0.002, augment_crop_min: 0.3}, {arch: small_cnn, input_size: 48}]",
    )  # fmt: skip
    lite, cnn = cfg.train.members
    p = member_params(cfg, lite, "lite", 8, "out/models/lite")
    assert (p.head_epochs, p.finetune_epochs, p.lr_head, p.lr_finetune) == (3, 10, 0.01, 0.002)
    q = member_params(cfg, cnn, "cnn", 8, "out/models/cnn")
    assert (q.head_epochs, q.finetune_epochs, q.lr_finetune) == (0, 10, 0.003)
    assert member_params(cfg, lite, "lite", 8, "x", finetune_epochs=4).finetune_epochs == 4  # a stage's own
    cache = DatasetCache(cfg, "out")
    no_rows = pd.DataFrame(columns=["image_id", "split"])
    jobs = {job.member.arch: job for job in make_jobs(cfg, no_rows, ["a"])}
    assert augment_of(cache, jobs["efficientnet_lite0"]).crop_scale == (0.3, 1.0)
    assert augment_of(cache, jobs["small_cnn"]).crop_scale == (cfg.train.augment_crop_min, 1.0)
    with pytest.raises(ConfigError, match=r"lr_finetune"):
        ingest_config("data", "out", "train.members=[{arch: small_cnn, lr_finetune: -1}]")


def test_learning_rates_scale_with_the_batch_when_given_for_a_reference_batch():
    """The linear scaling rule: rates meant for 64 images per batch, trained with 256, are 4x as large,
    the members' own rates too; without a reference batch they are used as written."""
    members = "[{arch: small_cnn, input_size: 48}, {arch: small_cnn, name: b, lr_head: 0.01}]"
    sets = ["train.lr_head=0.001", "train.lr_finetune=0.0001", f"train.members={members}"]
    plain = ingest_config("data", "out", *sets, "train.batch_size=256")
    scaled = ingest_config("data", "out", *sets, "train.batch_size=256", "train.lr_reference_batch=64")
    for cfg, factor in ((plain, 1), (scaled, 4)):
        a, b = (member_params(cfg, m, m.label, 8, "x") for m in cfg.train.members)
        assert (a.lr_head, a.lr_finetune, b.lr_head) == pytest.approx(
            (0.001 * factor, 0.0001 * factor, 0.01 * factor)
        )
    # Runs made before the setting existed keep their key while it is unset.
    assert plain.section_hash("train") != scaled.section_hash("train")
    before = plain.train.model_dump(mode="json", exclude={"lr_reference_batch", "compile"})
    digest = hashlib.sha256(json.dumps({"train": before}, sort_keys=True).encode()).hexdigest()[:16]
    assert plain.section_hash("train") == digest


def test_compiled_training_steps_match_eager_ones_and_weights_save_without_the_wrapper():
    """train.compile runs the passes through torch.compile (inductor, C++ on CPU): the same steps from
    the same weights give the same losses and weights as eager, to float rounding."""
    cfg = ingest_config(
        "data", "out", "train.compile=true", "train.members=[{arch: small_cnn, input_size: 32}]"
    )
    p = member_params(cfg, cfg.train.members[0], "small_cnn", 4, "memory://m")
    assert p.compile
    torch.manual_seed(0)
    # Without dropout: compiled code draws its masks from a generator of its own.
    eager = build_model("small_cnn", classes=4, input_size=32, dropout=0.0).to(
        memory_format=torch.channels_last
    )
    twin = build_model("small_cnn", classes=4, input_size=32, dropout=0.0).to(
        memory_format=torch.channels_last
    )
    twin.load_state_dict(eager.state_dict())
    generator = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(8, 3, 32, 32, generator=generator),
                "label": torch.randint(0, 4, (8,), generator=generator)} for _ in range(3)]  # fmt: skip
    from torch._dynamo.utils import counters

    counters.clear()
    results = []
    for model, compiled in ((eager, False), (twin, True)):
        runner = runner_for(model, dataclasses.replace(p, compile=compiled))  # what train_part calls
        assert (runner is model) != compiled
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        train = run_epoch(runner, batches, torch.device("cpu"), opt)
        val = run_epoch(runner, batches, torch.device("cpu"), None)
        results.append((train["loss"], val["loss"]))
    assert counters["stats"]["unique_graphs"] >= 2  # training and validation graphs, really compiled
    assert results[1] == pytest.approx(results[0], rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    assert not any("_orig_mod" in k for k in twin.state_dict())
