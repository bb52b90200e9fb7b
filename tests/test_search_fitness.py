"""Fitness: common random numbers, exact prefix sharing, the state cache, executors."""

import math

import pytest
import torch

from autodiffusion_rt.sampling import sample
from search.executors import LocalExecutor, split_by_prefix
from search.fitness import FitnessEvaluator
from search.space import Candidate

pytestmark = pytest.mark.usefixtures("search_single_thread")

N, BATCH, SEED = 24, 10, 5  # N not a multiple of BATCH: the last chunk is short, as in sample()


def evaluator(model, ext, ref, sampler="ddim", eta=0.0, **kw):
    return FitnessEvaluator(model, sampler, eta, N, SEED, ext, ref, batch_size=BATCH, **kw)


def family(model):
    """Candidates sharing prefixes in every way that matters: same t's, a different next t, other skips, other lengths."""
    a, b = sorted(model.unet.layer_ids)[:2]
    return [
        Candidate.full((999, 700, 400, 100)),
        Candidate.full((999, 700, 400, 50)),  # differs in the last step only
        Candidate.full((999, 700, 300, 100)),  # differs from step 2 on (DDIM's step 1 jumps to another t)
        Candidate((999, 700, 400, 100), ((), (a,), (), ())),  # same timesteps, other skip set at step 1
        Candidate((999, 700, 400, 100), ((), (a, b), (), ())),
        Candidate.full((999, 650, 400, 100)),  # DPM++: step 2's row depends on t_1 through h_1
        Candidate.full((999, 700, 400)),  # another NFE: the last step goes to clean data
        Candidate.full((900, 700, 400, 100)),  # no shared first step
    ]


def reference_images(model, cand, sampler, eta):
    keep = [None if not s else model.unet.layer_ids - set(s) for s in cand.skip]
    return sample(model, cand.timesteps, sampler, N, SEED, eta, keep, batch_size=BATCH)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("dpmpp_2m", 0.0), ("ddpm", 0.0), ("ddim", 0.7), ("ipndm", 0.0),
                                        ("unipc3", 0.0)])
@pytest.mark.slow
def test_shared_samples_are_exactly_sample(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, sampler, eta):
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, sampler, eta)
    cands = family(search_tiny_model)
    shared = ev.samples(cands)
    assert ev.counters.unet_calls < ev.counters.naive_unet_calls  # sharing happened
    for c, x in zip(cands, shared):
        ref = reference_images(search_tiny_model, c, sampler, eta)
        assert torch.equal(x, ref), f"{sampler} eta={eta}: {c} differs from sample() by {(x - ref).abs().max():.3g}"


def test_prefix_sharing_counts_exactly_the_distinct_prefixes(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, cache_bytes=0)
    cands = family(search_tiny_model)
    ev.samples(cands)
    # A DDIM model call at step d is determined by the state after steps 0..d-1 (genes 0..d-1 and
    # t_d, where step d-1 jumped to) and by (t_d, skip_d): count the distinct ones independently.
    calls = set()
    for c in cands:
        for d in range(c.nfe):
            calls.add((tuple(c.genes[:d]), c.timesteps[d], c.skip[d]))
    assert ev.counters.unet_calls == len(calls)
    assert ev.counters.naive_unet_calls == sum(c.nfe for c in cands)


def test_dpmpp_does_not_share_a_step_whose_coefficients_differ(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    # Same first two timesteps, different t_2: DPM-Solver++(2M)'s step 1 update reads h_0 and h_1, so
    # (999, 700, 400, ...) and (999, 700, 300, ...) share step 0's state and step 1's eps, but not step 1's update.
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, "dpmpp_2m", cache_bytes=0)
    a, b = Candidate.full((999, 700, 400, 100)), Candidate.full((999, 700, 300, 100))
    xa, xb = ev.samples([a, b])
    assert ev.counters.unet_calls == 2 + 2 + 2  # steps 0 and 1 shared, then two separate paths
    assert torch.equal(xa, reference_images(search_tiny_model, a, "dpmpp_2m", 0.0))
    assert torch.equal(xb, reference_images(search_tiny_model, b, "dpmpp_2m", 0.0))


def test_state_cache_reuses_earlier_prefixes_exactly(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    first = Candidate.full((999, 700, 400, 100))
    ev.samples([first])
    before = ev.counters.unet_calls
    later = Candidate.full((999, 700, 400, 50))  # shares the states after steps 0..1 (step 2 jumps to 50)
    (x,) = ev.samples([later])
    assert ev.counters.cache_hits == 1
    assert ev.counters.unet_calls - before == 2  # only steps 2 and 3
    assert torch.equal(x, reference_images(search_tiny_model, later, "ddim", 0.0))


MIXED = ("ddim", "dpmpp_2m", "ipndm", "unipc", "unipc3")


def test_samplers_of_one_schedule_share_their_first_step_exactly(
    search_tiny_model, search_tiny_extractor, search_tiny_ref_stats
):
    # The held-out table's case: one schedule from t = 999 (clipping on) under every deterministic sampler.
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, cache_bytes=0)
    cand = Candidate.full((999, 700, 400, 100))
    shared = ev.samples([cand] * len(MIXED), samplers=MIXED)
    for sampler, x in zip(MIXED, shared):
        ref = reference_images(search_tiny_model, cand, sampler, 0.0)
        assert torch.equal(x, ref), f"{sampler} differs from sample() by {(x - ref).abs().max():.3g}"
    # Every sampler's first step is DDIM's, so step 1's model call is shared too; UniPC-3 is UniPC-2 at 4 steps.
    assert ev.counters.unet_calls == 1 + 1 + 4 * 2


def test_a_cached_state_without_the_history_a_sampler_reads_is_not_reused(
    search_tiny_model, search_tiny_extractor, search_tiny_ref_stats
):
    # DDIM's states keep no x0 or eps history; a DPM-Solver++ or iPNDM candidate with the same first step must not
    # continue from them (it would read an empty history).
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    cand = Candidate.full((999, 700, 400, 100))
    ev.samples([cand])
    assert ev._cache, "DDIM's states were cached"
    for sampler in ("dpmpp_2m", "ipndm"):
        (x,) = ev.samples([cand], samplers=[sampler])
        assert torch.equal(x, reference_images(search_tiny_model, cand, sampler, 0.0)), sampler


def test_cache_respects_its_memory_budget(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    one_state = N * 1 * 8 * 8 * 4
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, cache_bytes=2 * one_state)
    ev.samples(family(search_tiny_model))
    assert ev._cache_used <= 2 * one_state and len(ev._cache) <= 2


def test_common_random_numbers_make_fid_independent_of_the_batch(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    cands = family(search_tiny_model)
    together = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats).evaluate(cands)
    alone = [evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, share=False).evaluate([c])[0] for c in cands[:3]]
    assert together[:3] == alone
    assert len(set(together)) == len(together)  # every schedule gives its own FID
    assert all(math.isfinite(f) and f >= 0 for f in together)


def test_unshared_evaluation_gives_the_same_fids_and_counts_naive_calls(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    cands = family(search_tiny_model)[:4]
    shared = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    plain = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, share=False)
    assert shared.evaluate(cands) == plain.evaluate(cands)
    assert plain.counters.unet_calls == plain.counters.naive_unet_calls == 16
    assert shared.counters.unet_calls < 16


def test_diverged_samples_get_infinite_fid(search_tiny_extractor, search_tiny_ref_stats, search_tiny_model):
    ev = evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    assert ev.fid_of(torch.full((N, 1, 8, 8), float("nan"))) == math.inf
    assert ev.counters.failed == 1


def test_local_executor_and_progress(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    class Bar:
        total, n = None, 0

        def reset(self, total):
            self.total = total

        def update(self, k):
            self.n += k

    ex = LocalExecutor(evaluator(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats))
    cands = family(search_tiny_model)[:3]
    bar = Bar()
    fids = ex.evaluate(cands, progress=bar)
    assert len(fids) == 3 and bar.n == bar.total == ex.counters.unet_calls + 3
    assert ex.counters.candidates == 3


def test_split_by_prefix_keeps_shared_first_steps_together():
    cands = [Candidate.full((999, 500 - i)) for i in range(5)] + [Candidate.full((900, 10)), Candidate.full((800, 10))]
    groups = split_by_prefix(cands, 3)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert any(set(range(5)) <= set(g) for g in groups)
    assert len(groups) == 3


@pytest.mark.parametrize("objective", ["trajectory", "trajectory-features"])
@pytest.mark.slow
def test_trajectory_objective_is_the_mean_per_sample_distance_to_the_teacher(search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, objective):
    """Recomputed independently: sample() images vs the teacher's DDIM-over-grid images of the same seed, in
    float64 numpy (pixels, or the extractor's features). What would catch this: comparing to another x_T, a
    distance over the whole batch instead of per sample, features of the wrong images."""
    import numpy as np

    from search.dp import compute_teacher, teacher_grid

    model = search_tiny_model
    grid = teacher_grid(model.num_timesteps, 10)
    teacher = compute_teacher(model, SEED, N, grid, batch_size=BATCH)
    ev = evaluator(model, search_tiny_extractor, search_tiny_ref_stats, objective=objective, target=teacher.final)
    cands = [Candidate.full((999, 700, 400)), Candidate.full((999, 500, 100))]
    got = ev.evaluate(cands)
    for c, value in zip(cands, got):
        img = reference_images(model, c, "ddim", 0.0)
        t_img = sample(model, grid, "ddim", N, SEED, batch_size=BATCH)
        if objective == "trajectory":
            a, b = img.numpy().astype(np.float64), t_img.numpy().astype(np.float64)
        else:
            a, b = (np.asarray(search_tiny_extractor.features(v), dtype=np.float64) for v in (img, t_img))
        want = np.sqrt(((a - b).reshape(N, -1) ** 2).mean(1)).mean()
        assert value == pytest.approx(want, rel=1e-9)
    # The teacher's own schedule is at distance 0.
    assert ev.evaluate([Candidate.full(tuple(grid))])[0] == pytest.approx(0.0, abs=1e-12)
