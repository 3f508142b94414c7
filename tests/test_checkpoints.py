"""Checkpoints from a models folder are untrusted: they load with ``weights_only=True``, so a pickle that
names code to run is refused (and the code never runs), and any unusable file is a one-line ModelError
naming it. Covers the members the crop, predict and report stages load (``load_classifier``), the
training loop's own resume state and best weights, and weights files (``zoo.load_state``)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pipeline.crop.localize import load_classifier
from pipeline.models import train_loop
from pipeline.models.train_loop import LoopState, TrainParams, save_torch
from pipeline.models.zoo import Classifier, ModelError, build_model, load_state


class RunsCode:
    """Unpickled with ``weights_only=False``, this calls ``func(*args)``: here, writing a sentinel file."""

    def __init__(self, sentinel: Path, how: str = "exec") -> None:
        self.sentinel, self.how = sentinel, how

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        if self.how == "system":
            return os.system, (f"touch {self.sentinel}",)
        return exec, (f"open({str(self.sentinel)!r}, 'w').write('ran')",)


def params(model_dir: Path) -> TrainParams:
    return TrainParams(member="m", arch="small_cnn", classes=3, model_dir=str(model_dir), input_size=48)


def model_for(p: TrainParams) -> Classifier:
    return build_model(p.arch, p.classes, head=p.head, input_size=p.input_size)


def write_best(model_dir: Path, **extra: Any) -> Path:
    """``best.pt`` as the training loop writes it, with ``extra`` keys added or replaced."""
    p = params(model_dir)
    saved = {"model": model_for(p).state_dict(), "params": asdict(p), "epoch": 1,
             "val": {"loss": 0.5, "top1": 0.75, "top5": 1.0, "images": 8}}  # fmt: skip
    path = model_dir / "best.pt"
    save_torch(saved | extra, str(path))
    return path


def test_a_checkpoint_as_training_writes_it_loads(tmp_path):
    write_best(tmp_path)
    model = load_classifier(str(tmp_path))
    assert isinstance(model, Classifier) and not model.training and model.input_size == 48


@pytest.mark.parametrize("how", ["exec", "system"])
@pytest.mark.parametrize("where", ["top", "params", "state_dict"])
def test_a_member_checkpoint_that_would_run_code_is_refused(how, where, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    payload = RunsCode(sentinel, how)
    p = params(tmp_path)
    if where == "top":
        path = write_best(tmp_path, epoch=payload)
    elif where == "params":
        path = write_best(tmp_path, params=asdict(p) | {"arch": payload})
    else:
        path = write_best(tmp_path, model=model_for(p).state_dict() | {"x": payload})
    with pytest.raises(ModelError) as caught:
        load_classifier(str(tmp_path))
    assert not sentinel.exists()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert "cannot be loaded safely" in message and "unsupported global" in message.lower()


def test_a_bare_pickle_that_would_run_code_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    (tmp_path / "best.pt").write_bytes(pickle.dumps({"model": {}, "params": RunsCode(sentinel)}))
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        load_classifier(str(tmp_path))
    assert not sentinel.exists()


def saved_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD_PARAMS = {"arch": "small_cnn", "classes": 3, "head": "linear", "input_size": 48}
DAMAGED = {
    "empty": (b"", "cannot be loaded safely (EOFError)"),
    "text": (b"<html>not a checkpoint</html>", "cannot be loaded safely (UnpicklingError"),
    "zip cut short": (saved_bytes({"a": torch.zeros(3)})[:200], "cannot be loaded safely"),
    "a list": (saved_bytes([1, 2]), "holds no model state dict"),
    "no params": (saved_bytes({"model": {"w": torch.zeros(1)}}), "holds no training parameters"),
    "model not tensors": (saved_bytes({"model": {"w": "x"}, "params": GOOD_PARAMS}), "no model state dict"),
    "unknown arch": (saved_bytes({"model": {}, "params": GOOD_PARAMS | {"arch": "nope"}}),
                     "unknown architecture 'nope'"),
    "classes as text": (saved_bytes({"model": {}, "params": GOOD_PARAMS | {"classes": "3"}}),
                        "params need arch and head (text), classes"),
    # Built before its weights are checked: a huge class count must be refused, not allocated.
    "a trillion classes": (saved_bytes({"model": {}, "params": GOOD_PARAMS | {"classes": 10**12}}),
                           "classes (1..100000)"),
    "weights of another model": (saved_bytes({"model": {"w": torch.zeros(2)}, "params": GOOD_PARAMS}),
                                 "does not fit its own params (RuntimeError: Error(s) in loading"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGED))
def test_an_unusable_member_checkpoint_is_one_clear_error(case, tmp_path):
    data, expected = DAMAGED[case]
    (tmp_path / "best.pt").write_bytes(data)
    with pytest.raises(ModelError) as caught:
        load_classifier(str(tmp_path))
    message = str(caught.value)
    assert expected in message and str(tmp_path / "best.pt") in message and "\n" not in message


def test_a_missing_member_checkpoint_names_the_file(tmp_path):
    with pytest.raises(ModelError, match=f"checkpoint not found: {tmp_path / 'best.pt'}"):
        load_classifier(str(tmp_path))


def test_a_weights_file_that_would_run_code_is_refused(tmp_path):
    sentinel, path = tmp_path / "SENTINEL", tmp_path / "weights.pth"
    path.write_bytes(saved_bytes({"conv.weight": torch.zeros(1), "x": RunsCode(sentinel)}))
    with pytest.raises(ModelError, match=f"weights file {path} cannot be loaded safely"):
        load_state(str(path))
    assert not sentinel.exists()


# The training loop, run as a Ray Train worker would run it, with Ray Train's context stood in for.


class FakeCheckpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield str(self.folder)


@pytest.fixture
def worker(monkeypatch, tmp_path):
    """A worker of rank 0 resuming from ``tmp_path/ckpt/state.pt``; returns the folders to fill."""
    import ray.train
    import ray.train.torch

    ckpt, model_dir = tmp_path / "ckpt", tmp_path / "model"
    ckpt.mkdir()
    model_dir.mkdir()
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: FakeCheckpoint(ckpt))
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    return ckpt, model_dir


def resume_state(p: TrainParams, **extra: Any) -> dict[str, Any]:
    """``state.pt`` as the loop reports it: here, after training finished (only prediction is left)."""
    model = model_for(p)
    optimizer = train_loop.make_optimizer(list(model.parameters()), p, p.epochs - 1)
    loop = LoopState(epoch=p.epochs, best_top1=0.5, best_loss=0.7, best_epoch=2, done=True,
                     history=[{"epoch": 0, "val_top1": 0.5}], starts=[0])  # fmt: skip
    return {"model_dir": p.model_dir, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "loop": asdict(loop)} | extra  # fmt: skip


def run_worker(p: TrainParams) -> None:
    part = {"params": asdict(p), "train": "train", "val": "val", "predict": "predict"}
    train_loop.train_loop_per_worker({"parts": [part]})


def test_a_resume_state_that_would_run_code_is_refused(worker, tmp_path):
    ckpt, model_dir = worker
    sentinel, p = tmp_path / "SENTINEL", params(model_dir)
    torch.save(resume_state(p, loop=RunsCode(sentinel)), ckpt / "state.pt")
    with pytest.raises(ModelError, match=f"training state {ckpt / 'state.pt'} cannot be loaded safely"):
        run_worker(p)
    assert not sentinel.exists()


def test_best_weights_that_would_run_code_are_refused_before_predicting(worker, tmp_path):
    ckpt, model_dir = worker
    sentinel, p = tmp_path / "SENTINEL", params(model_dir)
    torch.save(resume_state(p), ckpt / "state.pt")  # a sound state: the loop goes on to predict
    path = write_best(model_dir, val=RunsCode(sentinel, "system"))
    with pytest.raises(ModelError, match=f"checkpoint {path} cannot be loaded safely"):
        run_worker(p)
    assert not sentinel.exists()
    assert (model_dir / "history.json").exists()  # it did resume from state.pt, which loads as it should
