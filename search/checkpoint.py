"""The search state, checkpointed atomically after every generation.

The file is JSON: the settings the search was started with, where it is
(stage, generation), the random generator's state, the current population,
every FID measured so far (the memo), the history and the counters. A
multi-objective stage also stores where pymoo's NSGA-II is (its population,
counters and random state, as JSON data: see ``search/_pymoo.py``). A resumed
search is therefore the same computation as an uninterrupted one.

Loading is data only (no pickle: a checkpoint from someone else cannot run
code), and every field is checked: a damaged checkpoint is a SearchError that
names the field and says to start a new search.

Only the settings that change the result are compared on resume (not, for
instance, the batch size or the output path); any difference is refused,
naming the field and both values.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from autodiffusion_rt.utils import path_error, write_json

from .errors import SearchError
from .space import Candidate

STATE_FORMAT = "autodiffusion-rt-search-state"
STATE_VERSION = 2  # 2: the NSGA-II state is JSON data (version 1 pickled it)
READABLE_VERSIONS = (1, 2)  # a version-1 checkpoint loads unless it holds a pickled NSGA-II


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
    nsga2: Optional[dict] = None  # where NSGA-II is (multi-objective stage 2): _pymoo.nsga2_state

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
            "nsga2": self.nsga2,
        }

    @classmethod
    def from_json(cls, d: Any, source: str) -> "SearchState":
        """The state a checkpoint's JSON holds, every field checked: a SearchError names the first damaged one."""
        _check_format(d, source)
        r = _StateReader(d, source)
        settings = r.get("settings", lambda v: isinstance(v, dict), "must be an object")
        rng_state = r.get("rng_state", _valid_rng_state, "must be a numpy PCG64 generator state")
        stage = r.get("stage", lambda v: v in (1, 2) and not isinstance(v, bool), "must be 1 or 2")
        generation = r.get("generation", lambda v: _is_int(v) and v >= -1, "must be an integer >= -1")
        done = r.get("done", lambda v: isinstance(v, bool), "must be true or false")
        memo = r.memo()
        population = r.cands("population", r.get("population", lambda v: isinstance(v, list), "must be a list"))
        stage1_ranked = r.cands(
            "stage1_ranked", r.get("stage1_ranked", lambda v: isinstance(v, list), "must be a list")
        )
        for key, items in (("population", population), ("stage1_ranked", stage1_ranked)):
            missing = [i for i, c in enumerate(items) if c not in memo]
            if missing:
                raise r.bad(f"{key}[{missing[0]}]", "has no FID in the memo")
        if stage == 2 and not stage1_ranked:
            raise r.bad("stage1_ranked", "is empty in stage 2")
        if generation >= 0 and not population and not (stage == 2 and d.get("nsga2") is not None):
            raise r.bad("population", f"is empty after generation {generation}")
        history = r.get(
            "history",
            lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
            "must be a list of objects",
        )
        counters = r.get(
            "counters",
            lambda v: isinstance(v, dict) and all(_is_real(x) for x in v.values()),
            "must be an object of numbers",
        )
        elapsed = r.get(
            "elapsed", lambda v: _is_real(v) and math.isfinite(v) and v >= 0, "must be a number of seconds >= 0"
        )
        nsga2 = r.nsga2()
        return cls(
            settings=settings,
            rng_state=rng_state,
            stage=int(stage),
            generation=int(generation),
            done=done,
            memo=memo,
            population=population,
            stage1_ranked=stage1_ranked,
            history=list(history),
            counters=dict(counters),
            elapsed=float(elapsed),
            nsga2=nsga2,
        )

    def check_candidates(self, num_timesteps: int, nfe: int, layer_ids, source: str) -> None:
        """Refuse candidates that cannot belong to this search (wrong NFE, timesteps out of range, unknown layers)."""
        named = [(f"memo[{i}]", c) for i, c in enumerate(self.memo)]
        named += [(f"population[{i}]", c) for i, c in enumerate(self.population)]
        named += [(f"stage1_ranked[{i}]", c) for i, c in enumerate(self.stage1_ranked)]
        known = set(layer_ids)
        for where, c in named:
            ts = c.timesteps
            problem = None
            if len(ts) != nfe:
                problem = f"has {len(ts)} steps, expected NFE {nfe}"
            elif any(not 0 <= t < num_timesteps for t in ts):
                problem = f"has a timestep outside [0, {num_timesteps})"
            elif any(a <= b for a, b in zip(ts, ts[1:])):
                problem = "is not strictly descending"
            elif any(set(s) - known for s in c.skip):
                problem = f"skips unknown layer(s) {sorted(set().union(*c.skip) - known)[:3]}"
            if problem:
                raise SearchError(
                    f"{source} is a damaged search checkpoint: field {where!r} candidate {list(ts)} {problem}; "
                    "drop --resume to start a new search"
                )


def _check_format(d: Any, source: str) -> None:
    """A search checkpoint of a version this reads (and never a pickled NSGA-II state)."""
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
        raise SearchError(
            f"{source} is not a search checkpoint (format {STATE_FORMAT!r}): pass the file the search wrote, "
            "or drop --resume"
        )
    if d.get("version") not in READABLE_VERSIONS:
        raise SearchError(
            f"{source} has checkpoint version {d.get('version')!r}; this version reads {list(READABLE_VERSIONS)}: "
            "start a new search (drop --resume)"
        )
    if d.get("version") == 1 and d.get("nsga2") is not None:
        raise SearchError(
            f"{source}: field 'nsga2' holds a pickled NSGA-II state (checkpoint version 1), which is never "
            "loaded (a pickle can run code): start a new search (drop --resume)"
        )


class _StateReader:
    """Reads a checkpoint's fields; a damaged one is a SearchError naming it and saying to start a new search."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def bad(self, where: str, what: str) -> SearchError:
        return SearchError(
            f"{self.source} is a damaged search checkpoint: field {where!r} {what}; drop --resume to start a new search"
        )

    def get(self, key: str, ok, what: str):
        """Field ``key``, present and passing ``ok``."""
        if key not in self.d:
            raise self.bad(key, "is missing")
        if not ok(self.d[key]):
            raise self.bad(key, f"{what}, got {_short(self.d[key])}")
        return self.d[key]

    def cands(self, key: str, items) -> list:
        """``items`` as Candidates (``key[i]`` names a bad one)."""
        out = []
        for i, c in enumerate(items):
            try:
                out.append(_candidate(c))
            except (KeyError, TypeError, ValueError, SearchError) as e:
                raise self.bad(f"{key}[{i}]", f"is not a candidate ({e})") from None
        return out

    def memo(self) -> dict:
        """Every FID measured so far: Candidate -> FID (a number >= 0)."""
        memo_items = self.get(
            "memo",
            lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v),
            "must be a list of [candidate, FID] pairs",
        )
        memo = {}
        for i, (c, f) in enumerate(memo_items):
            (cand,) = self.cands(f"memo[{i}]", [c])
            try:
                fid = float(f)
            except (TypeError, ValueError):
                raise self.bad(f"memo[{i}]", f"has FID {_short(f)}, not a number") from None
            if math.isnan(fid) or fid < 0:
                raise self.bad(f"memo[{i}]", f"has FID {fid}, not a number >= 0")
            memo[cand] = fid
        return memo

    def nsga2(self) -> Optional[dict]:
        """Where NSGA-II is (its population of individuals, counters and random state), or None."""
        nsga2 = self.d.get("nsga2")
        if nsga2 is None:
            return None
        if not (
            isinstance(nsga2, dict)
            and isinstance(nsga2.get("pop"), list)
            and nsga2["pop"]
            and _valid_rng_state(nsga2.get("random_state"))
            and _is_int(nsga2.get("n_iter"))
            and _is_int(nsga2.get("n_eval"))
        ):
            raise self.bad("nsga2", "must be an NSGA-II state (pop, n_iter, n_eval, random_state)")
        for i, ind in enumerate(nsga2["pop"]):
            if not isinstance(ind, dict) or not {"X", "F", "G", "H", "CV", "evaluated", "data"} <= set(ind):
                raise self.bad(f"nsga2.pop[{i}]", "must be an individual (X, F, G, H, CV, evaluated, data)")
            self.cands(f"nsga2.pop[{i}].X", [ind["X"]])
        return nsga2


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _candidate(c) -> Candidate:
    if not (
        isinstance(c, dict)
        and isinstance(c.get("timesteps"), list)
        and all(_is_int(t) for t in c["timesteps"])
        and isinstance(c.get("skip"), list)
        and all(isinstance(s, list) and all(isinstance(i, str) for i in s) for s in c["skip"])
    ):
        raise ValueError("needs integer 'timesteps' and a list of layer-id lists 'skip'")
    return Candidate.from_json(c)


def _valid_rng_state(state) -> bool:
    import numpy as np

    if not isinstance(state, dict) or not state.get("bit_generator"):
        return False
    try:
        np.random.default_rng().bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError):
        return False
    return True


def save_state(state: SearchState, path: str | Path) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact.

    An OS error (a full disk) is a SearchError naming the checkpoint: the search stops, what it saved stays."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, state.to_json(), indent=None)
    except OSError as e:
        raise SearchError(
            path_error(
                e,
                path,
                "the checkpoint saved before (if any) is intact: fix that (e.g. free some space) "
                "and run again with --resume to continue from it",
                where=path.parent,
            )
        ) from None
    return path


def load_state(path: str | Path, settings: dict) -> SearchState:
    """Read a checkpoint and refuse it unless it was made with exactly ``settings``."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(
            f"--resume: no search checkpoint at {path}: run the search without --resume first "
            "(or pass --checkpoint PATH)"
        )
    from autodiffusion_rt.records import read_json

    try:
        d = read_json(path, SearchError, "the checkpoint is damaged or truncated; drop --resume to start a new search")
    except OSError as e:
        raise SearchError(
            f"cannot read the checkpoint {path}: {e.strerror or e}; fix its permissions or drop --resume"
        ) from None
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
