"""The GITS-style DP schedule optimizer: exact on synthetic matrices, and its cost matrix and teacher on a real (tiny) model."""

import itertools
import math

import numpy as np
import pytest
import torch

from autodiffusion_rt import sample
from search.dp import best_paths, compute_teacher, cost_matrix, dp_schedules, per_sample_rms, teacher_grid
from search.errors import SearchError

pytestmark = pytest.mark.usefixtures("search_single_thread")


def _brute_force(cost, steps):
    M = cost.shape[0]
    out = []
    for mid in itertools.combinations(range(1, M - 1), steps - 1):
        nodes = (0,) + mid + (M - 1,)
        total = sum(cost[a, b] for a, b in zip(nodes, nodes[1:]))
        if math.isfinite(total):
            out.append((total, nodes[:-1]))
    return sorted(out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_dp_finds_the_brute_force_optimum_and_k_best(seed, steps):
    """What would catch this: an off-by-one in the step count, a path that skips the start or end node,
    a k-best list that drops a tie or keeps a dominated path; all compared with full enumeration."""
    rng = np.random.default_rng(seed)
    M = 9
    cost = np.triu(rng.random((M, M)) * rng.choice([1, 10], size=(M, M)), k=1)
    cost[np.tril_indices(M)] = np.inf
    if seed % 2:
        cost[2, 5] = np.inf  # forbidden edges are honoured
    truth = _brute_force(cost, steps)
    got = best_paths(cost, steps, k=5)
    assert [p for _, p in got] == [p for _, p in truth[:5]]
    assert np.allclose([c for c, _ in got], [c for c, _ in truth[:5]])
    assert all(len(p) == steps and p[0] == 0 for _, p in got)


def test_dp_refuses_more_steps_than_grid_points():
    cost = np.triu(np.ones((4, 4)), k=1)
    with pytest.raises(SearchError, match="4 steps cannot be laid on a grid of 3 points"):
        best_paths(cost, 4)


def test_teacher_is_ddim_over_the_grid_from_the_search_x_T_and_cached(search_tiny_model, tmp_path):
    model = search_tiny_model
    grid = teacher_grid(model.num_timesteps, 12)
    assert grid[0] == model.num_timesteps - 1 and len(grid) == 12
    t1 = compute_teacher(model, 3, 16, grid, batch_size=8, cache_dir=tmp_path)
    # The teacher's sample is sample()'s DDIM over the grid for the same seed and N (common random numbers).
    ref = sample(model, grid, "ddim", n=16, seed=3, batch_size=8)
    assert torch.equal(t1.final, ref) and not t1.cached
    t2 = compute_teacher(model, 3, 16, grid, batch_size=8, cache_dir=tmp_path)
    assert t2.cached and torch.equal(t2.final, t1.final) and torch.equal(t2.states, t1.states)
    t3 = compute_teacher(model, 4, 16, grid, batch_size=8, cache_dir=tmp_path)  # another seed: another file
    assert not t3.cached and not torch.equal(t3.final, t1.final)
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 2


def test_cost_matrix_matches_direct_sampling_of_one_step_from_teacher_states(search_tiny_model):
    """C[i, j] from the teacher's cached states equals re-running the model at the teacher state and stepping
    DDIM from t_i to t_j with sample()'s arithmetic; C[0, G] is the one-step sample's distance to the teacher.
    What would catch this: a wrong target index, a step that ignores the clip, a row going to the wrong t."""
    model = search_tiny_model
    grid = teacher_grid(model.num_timesteps, 8)
    teacher = compute_teacher(model, 0, 12, grid, batch_size=12)
    C = cost_matrix(model, teacher)
    G = len(grid)
    one_step = sample(model, [grid[0]], "ddim", n=12, seed=0, batch_size=12)
    assert C[0, G] == pytest.approx(float(per_sample_rms(one_step, teacher.final).mean()), rel=1e-5)
    # A two-step sample through grid[3] then to clean: its first step lands where C[0, 3] measures.
    captured = {}
    sample(model, [grid[0], grid[3]], "ddim", n=12, seed=0, batch_size=12, callback=lambda d: captured.setdefault(d["i"], d["x_prev"]))
    assert C[0, 3] == pytest.approx(float(per_sample_rms(captured[0], teacher.states[3]).mean()), rel=1e-5)
    assert np.all(np.isinf(C[np.tril_indices(G + 1)]))
    # Consecutive grid steps are the teacher's own steps: zero error.
    assert np.allclose([C[i, i + 1] for i in range(G)], 0.0, atol=1e-6)


def test_dp_schedules_on_a_real_model_are_no_costlier_than_any_grid_path(search_tiny_model):
    model = search_tiny_model
    grid = teacher_grid(model.num_timesteps, 10)
    teacher = compute_teacher(model, 0, 16, grid, batch_size=16)
    res = dp_schedules(model, teacher, 3, k=3)
    assert len(res.paths) == 3 and all(ts[0] == model.num_timesteps - 1 and len(ts) == 3 for _, ts in res.paths)
    G = len(grid)
    every = sorted(sum(res.cost[a, b] for a, b in zip((0, i, j), (i, j, G))) for i, j in itertools.combinations(range(1, G), 2))
    assert np.allclose([c for c, _ in res.paths], every[:3])


def test_skip_sensitivity_is_the_one_step_damage_of_skipping_each_layer(search_tiny_model):
    """Recomputed through sample(): one DDIM step over [t_g, t_{g+1}] from the teacher state, with keep = all but L.
    What would catch this: the wrong layer skipped, the wrong target state, labels not those of the teacher."""
    from autodiffusion_rt.diffusion import compute_coefficients, step_update
    from autodiffusion_rt.sampling import initial_state
    from search.dp import skip_sensitivity

    model = search_tiny_model
    grid = teacher_grid(model.num_timesteps, 6)
    teacher = compute_teacher(model, 1, 8, grid, batch_size=8)
    table = skip_sensitivity(model, teacher, points=3, batch_size=8)
    assert table["timesteps"][0] == grid[0] and table["timesteps"][-1] == grid[-1] and len(table["timesteps"]) == 3
    assert len(table["cost"]) == 3 and all(len(r) == len(table["layers"]) for r in table["cost"])
    _, y, _ = initial_state(model, 8, 1)
    g = grid.index(table["timesteps"][1])
    lid = table["layers"][2]
    keep = model.unet.layer_ids - {lid}
    t = torch.full((8,), grid[g], dtype=torch.long)
    eps = model.eps(teacher.states[g], t, y, keep)
    x_next, _ = step_update(compute_coefficients("ddim", model.schedule, [grid[g], grid[g + 1]]).row(0), teacher.states[g], eps)
    want = float(((x_next.double() - teacher.states[g + 1].double()).flatten(1).pow(2).mean(1).sqrt()).mean())
    assert table["cost"][1][2] == pytest.approx(want, rel=1e-6)
    assert all(c > 0 for r in table["cost"] for c in r)  # every layer of the random UNet matters somewhere


@pytest.mark.slow
def test_skip_sensitivity_is_cached_on_disk_by_teacher_and_arguments(search_tiny_model, tmp_path):
    """A search over several NFEs computes the table once: the second call reads the file (not rewritten), other
    arguments get their own entry, and a damaged file is recomputed to the same table."""
    from search.dp import skip_sensitivity

    model = search_tiny_model
    teacher = compute_teacher(model, 1, 8, teacher_grid(model.num_timesteps, 6), batch_size=8)
    table = skip_sensitivity(model, teacher, points=3, batch_size=8, cache_dir=tmp_path)
    (path,) = tmp_path.glob("sensitivity-*.json")
    before = path.stat()
    assert skip_sensitivity(model, teacher, points=3, batch_size=8, cache_dir=tmp_path) == table
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert table == skip_sensitivity(model, teacher, points=3, batch_size=8)  # the uncached computation
    skip_sensitivity(model, teacher, points=2, batch_size=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2
    path.write_text("{not json")
    assert skip_sensitivity(model, teacher, points=3, batch_size=8, cache_dir=tmp_path) == table
