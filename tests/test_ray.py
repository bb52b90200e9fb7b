"""The Ray executor with a real Ray started in-process (2 CPUs) on the tiny search model: same plan as local, dead workers replaced."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from search.errors import SearchError
from search.run import SearchOptions, run_search

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.usefixtures("search_single_thread"), pytest.mark.slow]  # slow: the whole module (minutes)


@pytest.fixture(scope="module")
def ray_2cpus():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def opts(tmp_path):
    return SearchOptions(
        model="tiny:search", nfe=3, num_samples=24, population=6, generations=2, topk=2, mutants=2, crossovers=2,
        budget_fraction=0.85, report=False, batch_size=12, out=str(tmp_path / "plan.json"), quiet=True, compute="macs",
        holdout_confirm_samples=100,  # the held-out choice runs in this process either way: kept small
    )


@pytest.fixture
def run(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    def _run(options, **kw):
        return run_search(options, model=search_tiny_model, extractor=search_tiny_extractor, ref_stats=search_tiny_ref_stats, **kw)

    return _run


def _same(a, b):
    assert a.timesteps == b.timesteps and a.skip == b.skip
    assert a.fitness.fid == b.fitness.fid  # bit-identical: FIDs depend only on the candidate


def test_ray_with_two_workers_gives_the_same_plan_as_local_and_reports_workers(ray_2cpus, opts, run, tmp_path):
    _, local, _ = run(opts)
    result, remote, _ = run(replace(opts, executor="ray", workers=2, out=str(tmp_path / "ray.json")))
    _same(local, remote)
    summary = remote.provenance["summary"]
    assert summary["executor"] == "ray" and summary["workers"] == 2 and summary["workers_replaced"] == 0
    assert summary["speedup_vs_one_worker"] > 0
    assert local.provenance["summary"]["workers"] == 1
    # the workers' counters add up to the work of the search
    assert result.counters["candidates"] == result.evaluated


def test_a_worker_killed_mid_search_is_replaced_and_the_plan_is_the_same(ray_2cpus, opts, run, tmp_path, monkeypatch):
    """What would catch this: a lost group's FIDs left as None (the search would crash or rank garbage), or a
    replacement worker built from other noise (the FIDs, hence the plan, would differ)."""
    from search.executors import RayExecutor

    _, local, _ = run(opts)
    submitted = {"n": 0}
    original = RayExecutor._submit

    def submit_then_kill(self, slot, candidates):
        ref = original(self, slot, candidates)
        submitted["n"] += 1
        if submitted["n"] == 3:  # the second batch: a worker dies with a group in flight
            ray.kill(self.workers[slot], no_restart=True)
        return ref

    monkeypatch.setattr(RayExecutor, "_submit", submit_then_kill)
    _, remote, _ = run(replace(opts, executor="ray", workers=2, out=str(tmp_path / "ray.json")))
    _same(local, remote)
    assert remote.provenance["summary"]["workers_replaced"] >= 1


def test_missing_ray_says_what_to_install(opts, run, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SearchError, match=r"pip install 'ray'"):
        run(replace(opts, executor="ray"))
    _, plan, _ = run(opts)  # the local executor still works
    assert len(plan.timesteps) == 3


def test_unreachable_ray_address_is_named(opts, run):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(SearchError, match=rf"127\.0\.0\.1:{port}"):
        run(replace(opts, executor="ray", ray_address=f"127.0.0.1:{port}"))


@pytest.mark.parametrize("objective", ["trajectory", "trajectory-features"])
def test_ray_workers_compute_the_trajectory_fitness_of_the_local_evaluator(ray_2cpus, search_tiny_model, search_tiny_extractor,
                                                                           search_tiny_ref_stats, objective):
    """The workers get the evaluator with its objective and the teacher's target, so they return the local
    distances bit for bit, and those are the distances of sample()'s images to the target (float64, recomputed
    here). What would catch this: workers rebuilt from settings without the target (FIDs or an error instead)."""
    import torch

    from autodiffusion_rt import sample
    from search.dp import compute_teacher, teacher_grid
    from search.executors import LocalExecutor, RayExecutor
    from search.fitness import FitnessEvaluator
    from search.space import Candidate

    model = search_tiny_model
    teacher = compute_teacher(model, 0, 8, teacher_grid(model.num_timesteps, 6), batch_size=8)
    cands = [Candidate.full((999, 500, 100)), Candidate.full((999, 400, 50)), Candidate((900, 300, 20), ((), (model.unet.layers[0].id,), ()))]

    def evaluator():
        return FitnessEvaluator(model, "ddim", 0.0, 8, 0, search_tiny_extractor, search_tiny_ref_stats, batch_size=8,
                                objective=objective, target=teacher.final)

    local = LocalExecutor(evaluator()).evaluate(cands)
    with RayExecutor(evaluator(), workers=2) as remote:
        distances = remote.evaluate(cands)
    assert distances == local
    for c, d in zip(cands, distances):
        keep = [model.unet.layer_ids - set(s) for s in c.skip]
        images = sample(model, c.timesteps, "ddim", n=8, seed=0, keep=keep, batch_size=8)
        a, b = images, teacher.final
        if objective == "trajectory-features":
            a, b = (torch.as_tensor(search_tiny_extractor.features(x)) for x in (images, teacher.final))
        want = float((a.double() - b.double()).flatten(1).pow(2).mean(1).sqrt().mean())
        assert d == pytest.approx(want, rel=1e-9)
