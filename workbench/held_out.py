"""The held-out split of a store: its last whole context windows, kept out of SAE training so
that `workbench eval` scores tokens the SAE never saw.

A store's token_index runs window by window (window w holds token_index [w * ctx, (w + 1) * ctx)),
so the last windows are one token range at the end: training reads [0, start), evaluation
[start, stop), and neither needs a per-row filter. The rule is a fraction of the store's windows
(rounded up), capped at a number of tokens (rounded down to whole windows), and never all of
them. A split is recorded in the run's training.json (data.held_out) with what identifies the
store it was cut from (its capture settings' fingerprint) and a digest of the held-out token ids,
so evaluation can check it is scoring exactly those tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from sae.trainer import RECORD_FILE
from workbench.errors import WorkbenchError

#: Default share of a store's windows held out, and the most tokens held out.
HELD_OUT_FRACTION = 0.05
HELD_OUT_MAX_TOKENS = 1 << 20


@dataclass(frozen=True)
class HeldOutSplit:
    """Token_index [start, stop) of a store (its last `windows` windows of `ctx` tokens), cut
    by the rule (fraction, max_tokens) from a store of store_tokens tokens whose capture has
    store_fingerprint; token_ids_sha256 digests the held-out token ids."""

    fraction: float
    max_tokens: int
    ctx: int
    store_tokens: int
    windows: int
    start: int
    stop: int
    store_fingerprint: str
    token_ids_sha256: str

    @property
    def tokens(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"rule": f"last ceil({self.fraction:g} * windows) whole windows, at most {self.max_tokens:,} tokens", **asdict(self)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> HeldOutSplit:
        """The split training.json recorded; a missing or mistyped entry is refused."""
        kinds = {"fraction": (int, float), "store_fingerprint": (str,), "token_ids_sha256": (str,)}
        values = {}
        for f in fields(cls):
            value = record.get(f.name)
            if not isinstance(value, kinds.get(f.name, (int,))) or isinstance(value, bool):
                raise WorkbenchError(f"the held-out split in training.json is malformed ({f.name}: {value!r}); "
                                     "evaluate with --split all")
            values[f.name] = value
        if not 0 <= values["start"] <= values["stop"]:
            raise WorkbenchError(f"the held-out split in training.json is malformed (start {values['start']}, stop "
                                 f"{values['stop']}); evaluate with --split all")
        return cls(**values)


def store_fingerprint(store: Any) -> str:
    """A digest of what makes a capture: the model's weights, the data, ctx, batch size and
    requested tokens (a capture with the same ones stores the same tokens)."""
    capture = store.manifest.get("capture", {})
    key = {"model": store.manifest.get("model", {}).get("fingerprint"),
           **{k: capture.get(k) for k in ("data_fingerprint", "ctx", "batch_size", "tokens")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def token_ids_digest(store: Any, start: int, stop: int) -> str:
    """sha256 of the stored token ids of token_index [start, stop), as int64, in order."""
    ids = store.df("SELECT token_id FROM tokens WHERE token_index >= ? AND token_index < ? ORDER BY token_index",
                   [start, stop])["token_id"].to_numpy(dtype=np.int64)
    return hashlib.sha256(ids.tobytes()).hexdigest()


def held_out_split(store: Any, stored_tokens: int, fraction: float = HELD_OUT_FRACTION,
                   max_tokens: int = HELD_OUT_MAX_TOKENS) -> HeldOutSplit:
    """The split of a store holding stored_tokens tokens: its last ceil(fraction * windows)
    windows, at most max_tokens tokens, at least one window left to train on."""
    if not 0 <= fraction < 1:
        raise WorkbenchError(f"--held-out {fraction:g} must be at least 0 and below 1 (0: hold nothing out)")
    ctx = store.manifest.get("capture", {}).get("ctx")
    if not ctx:
        raise WorkbenchError(f"store {store.root} records no ctx in store.json; pass --held-out 0 to train without a split")
    windows = math.ceil(stored_tokens / ctx)
    held = min(math.ceil(fraction * windows), max_tokens // ctx, max(windows - 1, 0))
    start = min((windows - held) * ctx, stored_tokens)
    return HeldOutSplit(fraction=fraction, max_tokens=max_tokens, ctx=ctx, store_tokens=stored_tokens, windows=held,
                        start=start, stop=stored_tokens, store_fingerprint=store_fingerprint(store),
                        token_ids_sha256=token_ids_digest(store, start, stored_tokens))


def check_split_matches(split: HeldOutSplit, store: Any) -> None:
    """Refuse a store whose tokens at the split are not the recorded ones (a changed store)."""
    if token_ids_digest(store, split.start, split.stop) != split.token_ids_sha256:
        raise WorkbenchError(f"store {store.root}'s tokens [{split.start}, {split.stop}) are not the held-out tokens "
                             "recorded in training.json (their digest differs); evaluate with --split all")


def run_record(folder: Path) -> dict[str, Any] | None:
    """The training.json of a run or SAE folder, or None where it has none."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorkbenchError(f"cannot read {path}: {err}") from None
    if not isinstance(record, dict):
        raise WorkbenchError(f"{path} is not a training record (not a JSON object)")
    return record


def recorded_split(record: dict[str, Any] | None) -> tuple[HeldOutSplit | None, str | None]:
    """The split a run recorded, or None and why it has none."""
    if record is None:
        return None, "no training record (training.json) came with the SAE (it was not trained by `workbench train`)"
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    if "held_out" not in data:
        return None, "its training.json records no held-out split (the run predates them)"
    if data["held_out"] is None:
        return None, f"its run kept no held-out split ({data.get('held_out_note') or 'none recorded'})"
    if not isinstance(data["held_out"], dict):
        raise WorkbenchError("the held-out split in training.json is malformed (not an object); evaluate with --split all")
    return HeldOutSplit.from_dict(data["held_out"]), None


def training_split(store: Any, run: Path, resume: bool, fraction: float | None) -> HeldOutSplit | None:
    """The split a `workbench train` run on a store leaves out: a new run's by the rule
    (fraction, default HELD_OUT_FRACTION); a resumed run keeps its own (None for a run started
    without one), which a different --held-out may not change."""
    if not resume:
        return held_out_split(store, store.n_tokens(), HELD_OUT_FRACTION if fraction is None else fraction)
    split, _ = recorded_split(run_record(run))
    if fraction is not None and (split is None or split.fraction != fraction):
        had = "none" if split is None else f"{split.fraction:g}"
        raise WorkbenchError(f"cannot resume {run} with --held-out {fraction:g}: the run holds out {had}; "
                             "drop --held-out to keep its split")
    if split is not None:
        check_split_matches(split, store)
    return split


@dataclass(frozen=True)
class ScoredTokens:
    """What `workbench eval` scores: token_index [start, stop) of the store, "held-out" (the
    SAE's recorded split) or "all" (every stored token), with a note saying why when it is
    not the held-out split."""

    split: str
    start: int
    stop: int
    note: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "split_tokens": [self.start, self.stop], "split_note": self.note}


def scored_tokens(store: Any, record: dict[str, Any] | None, split: str = "held-out") -> ScoredTokens:
    """The tokens to evaluate an SAE on: with split "held-out", its run's recorded split of
    this store (checked against the stored token ids), else all stored tokens with a note
    (no split recorded, an empty one, or another store); with split "all", all of them."""
    everything = store.n_tokens()
    if split == "all":
        return ScoredTokens("all", 0, everything, "all stored tokens were asked for (--split all): they include the training tokens")
    if split != "held-out":
        raise WorkbenchError(f"--split {split} is not held-out or all")
    held, why = recorded_split(record)
    fallback = f"scoring all {everything:,} stored tokens, which may include the SAE's training tokens"
    if held is None:
        return ScoredTokens("all", 0, everything, f"no held-out split: {why}; {fallback}")
    if held.store_fingerprint != store_fingerprint(store):
        return ScoredTokens("all", 0, everything, f"store {store.root} is not the store the SAE trained on (its capture "
                            f"fingerprint differs); scoring all {everything:,} of its tokens")
    if held.tokens == 0:
        return ScoredTokens("all", 0, everything, f"the recorded held-out split is empty (--held-out {held.fraction:g} "
                            f"of {held.store_tokens:,} tokens); {fallback}")
    check_split_matches(held, store)
    return ScoredTokens("held-out", held.start, held.stop)
