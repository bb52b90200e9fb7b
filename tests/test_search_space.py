"""The search space: every operator returns a valid candidate, and changes what it claims to."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.errors import SearchError
from search.space import Candidate, SearchSpace

LAYERS = {f"l{i}": 10 + 7 * i for i in range(6)}  # skip-saved MACs per layer
FULL_STEP = 200  # MACs of one full step; 200 - sum(LAYERS) = 35 always run


def make_space(T=50, nfe=4, budget_fraction=None, allow_skip=True):
    full = FULL_STEP * nfe
    budget = None if budget_fraction is None else int(budget_fraction * full)
    return SearchSpace(T, nfe, LAYERS, FULL_STEP, budget_macs=budget, allow_skip=allow_skip)


def assert_valid(space, c):
    space.check(c)  # raises naming the broken invariant
    assert len(set(c.timesteps)) == space.nfe
    assert list(c.timesteps) == sorted(c.timesteps, reverse=True)
    assert all(0 <= t < space.T for t in c.timesteps)
    if space.budget_macs is not None:
        assert space.macs(c) <= space.budget_macs


def _space_or_skip(T, nfe, frac, allow_skip):
    try:
        return make_space(T, min(nfe, T), frac, allow_skip)
    except SearchError:
        return None


space_params = st.tuples(st.integers(3, 60), st.integers(1, 5), st.one_of(st.none(), st.floats(0.1, 1.0)), st.booleans())
raw_genes = st.lists(st.tuples(st.integers(-20, 80), st.sets(st.sampled_from(sorted(LAYERS) + ["bogus"]))), min_size=0, max_size=8)
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@HYP
@given(space_params, raw_genes, st.integers(0, 2**32 - 1))
def test_repair_makes_any_gene_list_valid(params, genes, seed):
    space = _space_or_skip(*params)
    if space is None:
        return
    c = space.repair(genes, np.random.default_rng(seed))
    assert_valid(space, c)


@HYP
@given(space_params, st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_mutation_is_valid_and_always_changes_something(params, seed, prob):
    space = _space_or_skip(*params)
    if space is None:
        return
    tight = space.budget_macs is not None and space.budget_macs < space.min_macs + min(LAYERS.values())
    if space.T == space.nfe and (not space.allow_skip or tight):
        return  # a single-point space: nothing to mutate to
    rng = np.random.default_rng(seed)
    parent = space.random(rng)
    child = space.mutate(parent, rng, prob)
    assert_valid(space, child)
    assert child != parent


@HYP
@given(space_params, st.integers(0, 2**32 - 1))
def test_crossover_is_valid_without_duplicate_timesteps_and_within_budget(params, seed):
    space = _space_or_skip(*params)
    if space is None:
        return
    rng = np.random.default_rng(seed)
    a, b = space.random(rng), space.random(rng)
    child = space.crossover(a, b, rng)
    assert_valid(space, child)
    # Skip sets come from the parents (or from the budget repair, which only adds to them).
    parent_skips = [set(s) for s in a.skip + b.skip]
    assert all(any(p <= set(s) for p in parent_skips) for s in child.skip)


def test_crossover_of_overlapping_parents_never_duplicates():
    # Parents whose timesteps collide at different positions: a naive position-wise crossover duplicates 30.
    space = make_space(T=100, nfe=4)
    a = Candidate.full((90, 60, 30, 10))
    b = Candidate.full((95, 30, 20, 5))
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert_valid(space, space.crossover(a, b, rng))


def test_crossover_rechecks_the_budget():
    # Two parents each within budget by skipping at different steps; picking the full steps of both would not be.
    space = make_space(T=100, nfe=2, budget_fraction=0.75)
    heavy = tuple(sorted(LAYERS))
    a = space.check(Candidate((90, 10), (heavy, ())))
    b = space.check(Candidate((80, 20), ((), heavy)))
    rng = np.random.default_rng(1)
    for _ in range(100):
        c = space.crossover(a, b, rng)
        assert space.macs(c) <= space.budget_macs


def test_skip_set_moves_with_its_timestep_when_reordered():
    space = make_space(T=100, nfe=3)
    # Gene (20, {l0}) mutated to 95 must sort first and keep {l0}; the others keep theirs.
    c = space.repair([(90, ["l1"]), (50, ["l2"]), (95, ["l0"])], np.random.default_rng(0))
    assert c.genes == [(95, ("l0",)), (90, ("l1",)), (50, ("l2",))]


def test_mutated_timestep_keeps_its_skip_set():
    # prob=0: exactly one gene mutates, either moving its timestep (with its skip set) or flipping one layer.
    space = make_space(T=1000, nfe=4)
    parent = Candidate((900, 600, 300, 100), (("l0",), ("l1",), ("l2",), ("l3",)))
    old = dict(parent.genes)
    rng = np.random.default_rng(0)
    moves = flips = 0
    for _ in range(300):
        child = space.mutate(parent, rng, 0.0)
        new = [(t, s) for t, s in child.genes if t not in old]
        if new:
            moves += 1
            (t, s), = new
            gone = [g for g in parent.genes if g[0] not in child.timesteps]
            assert gone == [(gone[0][0], s)], "the moved gene must carry its own skip set"
            assert all(old[t2] == s2 for t2, s2 in child.genes if t2 in old)
        else:
            flips += 1
            diffs = [set(s) ^ set(old[t]) for t, s in child.genes]
            assert sorted(len(d) for d in diffs) == [0, 0, 0, 1]
    assert moves > 50 and flips > 50


def test_stage1_space_never_skips():
    space = make_space(allow_skip=False)
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = space.mutate(space.random(rng), rng, 0.5)
        assert c.num_skipped == 0


def test_uniform_candidates_are_the_baselines():
    space = make_space(T=1000, nfe=4)
    assert space.uniform("linear").timesteps == (999, 749, 499, 249)
    assert space.uniform("quadratic").timesteps == (999, 561, 249, 61)
    budgeted = make_space(T=1000, nfe=4, budget_fraction=0.8)
    c = budgeted.uniform("linear", np.random.default_rng(0))
    assert c.timesteps == (999, 749, 499, 249) and budgeted.macs(c) <= budgeted.budget_macs


def test_infeasible_budget_is_refused_with_the_minimum():
    # Always-run MACs are 200 - 165 = 35 per step: 140 of 800 at NFE 4, a fraction of 0.175.
    with pytest.raises(SearchError, match=r"no candidate can meet the budget.*at least 0\.175"):
        make_space(T=100, nfe=4, budget_fraction=0.1)
    with pytest.raises(SearchError, match="the full model"):
        make_space(T=100, nfe=4, budget_fraction=0.5, allow_skip=False)


@pytest.mark.parametrize("nfe", [0, -1, 51, True])
def test_nfe_out_of_range_is_refused(nfe):
    with pytest.raises(SearchError, match="NFE"):
        SearchSpace(50, nfe, LAYERS, FULL_STEP)


def test_check_names_the_broken_invariant():
    space = make_space(T=100, nfe=3, budget_fraction=0.5)
    with pytest.raises(SearchError, match="not strictly descending"):
        space.check(Candidate.full((10, 50, 5)))
    with pytest.raises(SearchError, match="outside"):
        space.check(Candidate.full((100, 50, 5)))
    with pytest.raises(SearchError, match="over the budget"):
        space.check(Candidate.full((90, 50, 5)))
    with pytest.raises(SearchError, match="unknown layer"):
        space.check(Candidate((90, 50, 5), (("nope",) + tuple(LAYERS), tuple(LAYERS), tuple(LAYERS))))


def test_candidate_json_round_trip():
    c = Candidate((9, 5, 1), (("b", "a"), (), ("c",)))
    assert c.skip[0] == ("a", "b")  # normalised: sorted, hashable
    assert Candidate.from_json(c.to_json()) == c
    assert hash(Candidate.from_json(c.to_json())) == hash(c)


# A synthetic sensitivity table: cost per MAC saved ranks the layers l3 < l1 < l5 < l0 < l4 < l2 at t=40 and the
# reverse at t=10 (costs = score x MACs, so the cheapest per MAC is not the cheapest in cost).
GUIDE_ORDER = ["l3", "l1", "l5", "l0", "l4", "l2"]
GUIDE_SCORE = {lid: 1e-3 * 2**k for k, lid in enumerate(GUIDE_ORDER)}
GUIDE_TABLE = {
    "timesteps": [40, 10],
    "layers": list(LAYERS),
    "macs": list(LAYERS.values()),
    "cost": [[GUIDE_SCORE[lid] * m for lid, m in LAYERS.items()],
             [GUIDE_SCORE[GUIDE_ORDER[5 - GUIDE_ORDER.index(lid)]] * m for lid, m in LAYERS.items()]],
}


def _flip_counts(space, parent, draws=3000, seed=0):
    """How often a mutation skips (or runs again) each layer at the steps of each table row (timestep kept)."""
    rng = np.random.default_rng(seed)
    counts = {40: dict.fromkeys(LAYERS, 0), 10: dict.fromkeys(LAYERS, 0)}
    for _ in range(draws):
        child = space.mutate(parent, rng, 0.5)
        for (t, s), (pt, ps) in zip(child.genes, parent.genes):
            if t == pt:
                for lid in set(s) ^ set(ps):
                    counts[40 if t > 25 else 10][lid] += 1
    return {row: {lid: n / max(1, sum(c.values())) for lid, n in c.items()} for row, c in counts.items()}


def test_guided_skip_mutation_prefers_layers_cheap_per_mac_saved_at_the_genes_timestep():
    """What would catch this: uniform draws (every share ~1/6), the cost instead of the cost per MAC (l5, the
    largest layer, would lead), or the wrong row (the order at t=10 is the reverse)."""
    space = make_space()
    parent = Candidate.full((45, 30, 12, 5))
    uniform = _flip_counts(space, parent)
    assert all(0.1 < f < 0.25 for row in uniform.values() for f in row.values())
    space.set_skip_guide(GUIDE_TABLE)
    guided = _flip_counts(space, parent)
    for row, order in ((40, GUIDE_ORDER), (10, GUIDE_ORDER[::-1])):
        f = [guided[row][lid] for lid in order]
        assert f[0] > 0.3 and f[0] > f[1] > f[2] > max(f[3:]) and f[5] < 0.08
        assert min(f) > 0.02  # a uniform share remains: no layer is ruled out
    # Running a layer again favours the costly ones: every layer skipped at every step, so each flip unskips.
    everything = Candidate((45, 30, 12, 5), (tuple(LAYERS),) * 4)
    back = _flip_counts(space, everything)
    assert max(back[40], key=back[40].get) == "l2" and max(back[10], key=back[10].get) == "l3"


def test_guided_budget_repair_skips_the_cheapest_layer_steps_first():
    space = make_space(budget_fraction=0.99)  # one skip of any layer meets it
    space.set_skip_guide(GUIDE_TABLE)
    rng = np.random.default_rng(1)
    first = {}
    for _ in range(2000):
        c = space.repair([(45, ()), (30, ()), (12, ()), (5, ())], rng)
        ((step, lid),) = [(i, lid) for i, s in enumerate(c.skip) for lid in s]
        first[(step < 2, lid)] = first.get((step < 2, lid), 0) + 1
    top = sorted(first, key=first.get, reverse=True)[:4]
    assert set(top) == {(True, "l3"), (False, "l2"), (True, "l1"), (False, "l4")}  # the two cheapest of each row
