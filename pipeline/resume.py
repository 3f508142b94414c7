"""Resuming work inside a stage: one folder of finished parts that belongs to one key.

The runner skips a stage whose completion marker matches its key (``runner.run_stages``); a stage that
is interrupted half-way resumes through a :class:`KeyedFolder`: the parts it finished (shards of pairs,
batches of crops or pre-labels, a trained model) are files written atomically under a folder tied to
the stage's key, and a run with the same key reads them back instead of doing that work again. Files of
another key (other settings, other data) are never taken for this one's.

Two ways to tie a folder to a key, both here: the key in the folder's name (:meth:`KeyedFolder.named`:
folders of other keys stay, and a config that comes back finds its parts), or a ``_KEY`` file inside a
folder of a fixed name (:meth:`KeyedFolder.claim`: the folder's other files go when the key changes; for
folders users read, such as ``OUT/cropped``, whose name cannot change).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline import manifests, storage
from pipeline.layout import DONE_FILE

KEY_FILE = "_KEY"


@dataclass(frozen=True)
class KeyedFolder:
    uri: str
    key: str

    @classmethod
    def named(cls, parent: str, name: str, key: str) -> KeyedFolder:
        """``parent/<name>-<key>``: a folder per key."""
        return cls(storage.join(parent, f"{name}-{key}"), key)

    def claim(self, whole: bool = True, also: tuple[str, ...] = ()) -> str | None:
        """Make the folder this key's. When it held another key's files, they go (the whole folder, or
        with ``whole`` false only its files and the subfolders named in ``also``: nested folders that are
        not its own stay) and that key is returned; None when the folder already was this key's or new."""
        key_file = storage.join(self.uri, KEY_FILE)
        previous = storage.read_text(key_file).strip() if storage.exists(key_file) else None
        if previous == self.key:
            return None
        if whole:
            storage.remove(self.uri)
        else:
            for uri in storage.list_files(self.uri):
                storage.remove(uri)
            for name in also:
                storage.remove(storage.join(self.uri, name))
        storage.write_text_atomic(key_file, self.key)
        return previous

    # -- numbered parts (shards whose number says which piece of the work they are)
    def part(self, prefix: str, number: int) -> str:
        return storage.join(self.uri, f"{prefix}-{number:06d}.parquet")

    def finished(self, prefix: str) -> set[int]:
        """Numbers of the parts whose file exists (files are written atomically)."""
        names = (u.rsplit("/", 1)[-1] for u in storage.list_files(self.uri, ".parquet"))
        return {int(n[len(prefix) + 1 : -len(".parquet")]) for n in names if n.startswith(f"{prefix}-")}

    # -- unnumbered parts (batches whose rows say what they hold)
    def new_part(self, prefix: str) -> str:
        """A fresh part file's URI: batches of one run and of a resumed one never collide."""
        return storage.join(self.uri, f"{prefix}-{uuid.uuid4().hex}.parquet")

    def read_parts(self, prefix: str) -> pd.DataFrame:
        """Every part of ``prefix`` as one frame (empty without any)."""
        frames = [manifests.read_table(u).to_pandas() for u in storage.list_files(self.uri, ".parquet")
                  if u.rsplit("/", 1)[-1].startswith(f"{prefix}-")]  # fmt: skip
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # -- a piece of work done as a whole (a trained model), with what it gave
    def done(self) -> dict[str, Any] | None:
        """What the work gave when it finished under this key; None when it did not."""
        uri = storage.join(self.uri, DONE_FILE)
        if not storage.exists(uri):
            return None
        try:
            record = json.loads(storage.read_text(uri))
        except ValueError:
            return None
        return record.get("result") if record.get("key") == self.key else None

    def mark_done(self, result: dict[str, Any]) -> None:
        record = json.dumps({"key": self.key, "result": result})
        storage.write_text_atomic(storage.join(self.uri, DONE_FILE), record)
