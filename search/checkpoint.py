"""The search state, checkpointed atomically after every generation.

The file is JSON: the settings the search was started with, where it is
(stage, generation), the random generator's state, the current population,
every FID measured so far (the memo), the history and the counters. A
multi-objective stage also stores pymoo's NSGA-II object (pickled, base64):
its own random state and population are part of where the search is. A
resumed search is therefore the same computation as an uninterrupted one.

Only the settings that change the result are compared on resume (not, for
instance, the batch size or the output path); any difference is refused,
naming the field and both values.
"""

from __future__ import annotations

import base64
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from autodiffusion_rt.utils import atomic_write

from .errors import SearchError
from .space import Candidate

STATE_FORMAT = "autodiffusion-rt-search-state"
STATE_VERSION = 1


@dataclass
class SearchState:
    settings: dict
    rng_state: dict
    stage: int = 1
    generation: int = -1  # the last completed generation of this stage; -1: none yet
    done: bool = False
    memo: dict = field(default_factory=dict)  # Candidate -> FID
    population: list = field(default_factory=list)  # the current stage's evaluated population
    stage1_ranked: list = field(default_factory=list)  # stage 1's final ranking (stage 2 starts from it)
    history: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)  # evaluation counters of earlier sessions (summed)
    elapsed: float = 0.0  # seconds spent in earlier sessions
    nsga2: Optional[bytes] = None  # pickled pymoo algorithm (multi-objective stage 2)

    def to_json(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "settings": self.settings,
            "rng_state": self.rng_state,
            "stage": self.stage,
            "generation": self.generation,
            "done": self.done,
            # FIDs as repr strings: inf survives strict JSON, and floats round-trip exactly.
            "memo": [[c.to_json(), repr(float(f))] for c, f in self.memo.items()],
            "population": [c.to_json() for c in self.population],
            "stage1_ranked": [c.to_json() for c in self.stage1_ranked],
            "history": self.history,
            "counters": self.counters,
            "elapsed": self.elapsed,
            "nsga2": None if self.nsga2 is None else base64.b64encode(self.nsga2).decode("ascii"),
        }

    @classmethod
    def from_json(cls, d: Any, source: str) -> "SearchState":
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise SearchError(f"{source} is not a search checkpoint (format {STATE_FORMAT!r}): pass the file the search wrote, or drop --resume")
        if d.get("version") != STATE_VERSION:
            raise SearchError(f"{source} has checkpoint version {d.get('version')!r}; this version reads {STATE_VERSION}: start a new search (drop --resume)")
        try:
            return cls(
                settings=d["settings"],
                rng_state=d["rng_state"],
                stage=int(d["stage"]),
                generation=int(d["generation"]),
                done=bool(d["done"]),
                memo={Candidate.from_json(c): float(f) for c, f in d["memo"]},
                population=[Candidate.from_json(c) for c in d["population"]],
                stage1_ranked=[Candidate.from_json(c) for c in d["stage1_ranked"]],
                history=list(d["history"]),
                counters=dict(d["counters"]),
                elapsed=float(d["elapsed"]),
                nsga2=None if d.get("nsga2") is None else base64.b64decode(d["nsga2"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SearchError(f"{source} is a damaged search checkpoint ({type(e).__name__}: {e}): drop --resume to start a new search") from None


def save_state(state: SearchState, path: str | Path) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(state.to_json(), f)
    return path


def load_state(path: str | Path, settings: dict) -> SearchState:
    """Read a checkpoint and refuse it unless it was made with exactly ``settings``."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"--resume: no search checkpoint at {path}: run the search without --resume first (or pass --checkpoint PATH)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SearchError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; drop --resume to start a new search") from None
    state = SearchState.from_json(d, str(path))
    diff = settings_diff(state.settings, settings)
    if diff:
        raise SearchError(
            f"cannot resume from {path}: it was made with other settings ({diff}). Resume with the same settings, "
            f"or drop --resume to start a new search (it will overwrite this checkpoint)"
        )
    return state


def settings_diff(saved: dict, current: dict) -> Optional[str]:
    """Every differing setting as 'key: X in the checkpoint, Y in this search'; None if all are equal."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if _norm(a) != _norm(b):
            diffs.append(f"{key}: {a!r} in the checkpoint, {b!r} in this search")
    return "; ".join(diffs) or None


def _norm(x):
    # JSON turns tuples into lists; compare the JSON forms.
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return json.loads(json.dumps(x))


def dumps_pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads_pickle(data: bytes):
    # The pickle is the search's own checkpoint (written above), not foreign input.
    return pickle.loads(data)
