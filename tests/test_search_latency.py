"""--compute latency (search/latency.py): the per-layer table's predictor, its cache, and the search using it."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from autodiffusion_rt.errors import PlanError
from autodiffusion_rt.plan import Plan
from search.latency import (
    NS_PER_MS,
    LatencyTable,
    cache_path,
    load_or_measure,
    resolve_key,
    table_from_medians,
    table_from_rounds,
)
from search.run import SearchOptions, run_search
from search.space import Candidate

pytestmark = pytest.mark.usefixtures("search_single_thread")

KEY = {"backend": "openvino", "precision": "bf16", "batch": 1, "threads": 1, "cpu": "Test CPU", "model_fingerprint": "f",
       "versions": {"openvino": "1"}}


def _synthetic(layer_ids, seed=0) -> LatencyTable:
    rng = np.random.default_rng(seed)
    return LatencyTable(dict(KEY), float(rng.uniform(0, 2)), float(rng.uniform(0.1, 1)),
                        {lid: float(rng.uniform(0, 0.5)) for lid in layer_ids})


def test_prediction_is_the_sum_of_its_parts_and_monotone_in_kept_layers():
    ids = [f"L{k}" for k in range(7)]
    rng = np.random.default_rng(1)
    for seed in range(20):
        t = _synthetic(ids, seed)
        skips = [tuple(lid for lid in ids if rng.random() < 0.4) for _ in range(int(rng.integers(1, 6)))]
        # the sum written out independently: overhead + per step (fixed + every kept layer), in float64
        want = t.request_ms + sum(t.fixed_ms + sum(t.layer_ms[lid] for lid in ids if lid not in s) for s in skips)
        assert t.predict_ms(skips) == pytest.approx(want, rel=1e-12)
        assert t.full_ms(len(skips)) == pytest.approx(t.request_ms + len(skips) * (t.fixed_ms + sum(t.layer_ms.values())))
        # keeping one more layer at one step never predicts less; skipping everything leaves overhead + fixed parts
        i = int(rng.integers(len(skips)))
        for lid in skips[i]:
            more = [tuple(x for x in s if not (k == i and x == lid)) for k, s in enumerate(skips)]
            assert t.predict_ms(more) >= t.predict_ms(skips)
        assert t.predict_ms([ids] * len(skips)) == pytest.approx(t.request_ms + len(skips) * t.fixed_ms)
        # the search space's integer ns add up to the same prediction (to the rounding of each part)
        layer_ns, full_ns = t.space_costs(ids)
        space_ns = sum(full_ns - sum(layer_ns[lid] for lid in s) for s in skips)
        assert abs((space_ns / NS_PER_MS + t.request_ms) - t.predict_ms(skips)) <= 1e-6 * (len(ids) + 1) * len(skips)


def test_the_table_from_a_measurement_walk_is_the_additive_decomposition():
    """Written out by hand: the fixed part is the all-skipped step; the savings (clamped at 0) are scaled to fill
    the full step above it, so the prediction is exact at both ends (everything kept, everything skipped)."""
    ids = ["a", "b", "c"]
    t = table_from_medians(KEY, ids, [10.0, 8.0, 9.5, 10.2, 6.0], 3.0, {})
    assert t.fixed_ms == 6.0 and t.request_ms == 3.0  # savings 2, 0.5, 0 (slower without c: noise) fill 10 - 6
    assert t.layer_ms == {"a": pytest.approx(3.2), "b": pytest.approx(0.8), "c": 0.0}
    assert t.predict_ms([()]) == pytest.approx(13.0) and t.predict_ms([ids]) == pytest.approx(9.0)
    t = table_from_medians(KEY, ids, [10.0, 2.0, 3.0, 4.0, 1.0], -1.0, {})  # single savings exceed the whole
    assert sum(t.layer_ms.values()) == pytest.approx(9.0) and t.fixed_ms == 1.0 and t.request_ms == 0.0
    assert t.layer_ms["a"] == pytest.approx(9.0 * 8 / 21)
    # no single skip saves anything measurable, but skipping all saves 6 ms: spread evenly, both ends still exact
    t = table_from_medians(KEY, ids, [10.0, 10.3, 10.0, 11.0, 4.0], 1.0, {})
    assert t.fixed_ms == 4.0 and t.layer_ms == {"a": pytest.approx(2.0), "b": pytest.approx(2.0), "c": pytest.approx(2.0)}
    # rounds: a load that slows a whole round (round 2, x3) cancels in the paired differences
    full, a, b, none = [10.0, 30.0, 10.0], [9.0, 27.0, 9.0], [8.0, 24.0, 8.0], [5.0, 15.0, 5.0]
    t = table_from_rounds(KEY, ["a", "b"], [full, a, b, none], [33.0, 99.0, 33.0], {}, [9.0, 27.0, 9.0])
    assert t.fixed_ms == pytest.approx(5.0) and t.request_ms == pytest.approx(1.0) and t.reuse_ms == pytest.approx(1.0)
    assert t.layer_ms == {"a": pytest.approx(5.0 / 3), "b": pytest.approx(10.0 / 3)}


def test_a_step_that_repeats_its_predecessors_keep_set_saves_the_reuse_on_shared_subnetworks_only():
    ids = ["a", "b"]
    shared = LatencyTable(dict(KEY), 1.0, 2.0, {"a": 1.0, "b": 0.5}, reuse_ms=0.25)  # KEY: openvino
    assert shared.predict_ms([(), (), ("a",), ("a",), ()]) == pytest.approx(1.0 + 3 * 3.5 + 2 * 2.5 - 2 * 0.25)
    assert shared.full_ms(4) == pytest.approx(1.0 + 4 * 3.5 - 3 * 0.25)
    assert shared.predict_ms([("a", "b"), ("b", "a")]) == pytest.approx(1.0 + 2 * 2.0 - 0.25)  # a set, not a list
    per_step = LatencyTable({**KEY, "backend": "onnxruntime"}, 1.0, 2.0, {"a": 1.0, "b": 0.5}, reuse_ms=0.25)
    assert per_step.predict_ms([(), ()]) == pytest.approx(1.0 + 2 * 3.5)  # one engine per step: nothing shared
    assert LatencyTable.from_json(shared.to_json(), dict(KEY), ids).reuse_ms == 0.25


@pytest.mark.parametrize("field, value", [("backend", "onnxruntime"), ("precision", "fp32"), ("batch", 4),
                                          ("threads", 2), ("cpu", "Other CPU")])
def test_a_cached_table_is_reused_only_when_all_five_match(tmp_path, search_tiny_model, field, value):
    ids = [layer.id for layer in search_tiny_model.unet.layers]
    calls = []

    def measure(model, key):
        calls.append(key)
        return _synthetic(ids, len(calls)).__class__(dict(key), 1.0, 0.5, {lid: 0.1 * len(calls) for lid in ids})

    key = {**KEY, "model_fingerprint": search_tiny_model.fingerprint}
    first = load_or_measure(search_tiny_model, key, tmp_path, measure)
    again = load_or_measure(search_tiny_model, dict(key), tmp_path, measure)
    assert len(calls) == 1 and again.layer_ms == first.layer_ms  # same five: read back, not measured
    other = load_or_measure(search_tiny_model, {**key, field: value}, tmp_path, measure)
    assert len(calls) == 2 and other.key[field] == value and other.layer_ms != first.layer_ms
    # both tables stay cached side by side, each reused for its own key
    load_or_measure(search_tiny_model, key, tmp_path, measure)
    load_or_measure(search_tiny_model, {**key, field: value}, tmp_path, measure)
    assert len(calls) == 2


@pytest.mark.parametrize("content", [
    b"\x00\xff not json", b"[1, 2]", b'{"format": "autodiffusion-rt-latency-table"}', b"{" * 100000,
    "nan", "negative", "huge", "string", "other-key", "missing-layer",
], ids=["binary", "list", "no-key", "deep-nesting", "nan", "negative", "huge", "string", "other-key", "missing-layer"])
def test_a_corrupt_or_hostile_cache_file_is_measured_again_with_a_warning(tmp_path, search_tiny_model, content):
    ids = [layer.id for layer in search_tiny_model.unet.layers]
    key = {**KEY, "model_fingerprint": search_tiny_model.fingerprint}
    good = LatencyTable(dict(key), 1.0, 0.5, {lid: 0.25 for lid in ids})
    path = cache_path(tmp_path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        d = good.to_json()
        first = ids[0]
        if content == "other-key":
            d["key"] = {**key, "threads": 8}
        elif content == "missing-layer":
            del d["layer_ms"][first]
        else:
            d["layer_ms"][first] = {"nan": math.nan, "negative": -1.0, "huge": 1e300, "string": "1"}[content]
        path.write_text(json.dumps(d))
    calls = []
    with pytest.warns(UserWarning, match="unusable.*measuring again"):
        got = load_or_measure(search_tiny_model, key, tmp_path, lambda m, k: calls.append(k) or good)
    assert calls and got is good
    assert LatencyTable.from_json(json.loads(path.read_text()), key, ids) is not None  # replaced by the new table


def test_an_unwritable_cache_warns_and_still_gives_the_table(tmp_path, search_tiny_model):
    (tmp_path / "file").write_text("x")
    ids = [layer.id for layer in search_tiny_model.unet.layers]
    good = LatencyTable(dict(KEY), 1.0, 0.5, {lid: 0.25 for lid in ids})
    with pytest.warns(UserWarning, match="cannot cache the latency table"):
        assert load_or_measure(search_tiny_model, KEY, tmp_path / "file" / "cache", lambda m, k: good) is good


def test_a_real_measurement_on_the_torch_fallback(tmp_path, search_tiny_model):
    """The whole measurement (plan of L + 2 steps, the runtime's walk, the medians) on the tiny model's torch
    engines: every part finite and >= 0, cached, and the full and all-skipped steps are what was measured."""
    key = resolve_key(search_tiny_model, "torch", "auto", 1, 1)
    assert {k: key[k] for k in ("backend", "precision", "batch", "threads")} == {
        "backend": "torch", "precision": "fp32", "batch": 1, "threads": 1}
    from search.latency import measure_table

    t = load_or_measure(search_tiny_model, key, tmp_path, lambda m, k: measure_table(m, k, rounds=3, progress=False))
    assert set(t.layer_ms) == {layer.id for layer in search_tiny_model.unet.layers}
    assert all(v >= 0 and math.isfinite(v) for v in [t.request_ms, t.fixed_ms, *t.layer_ms.values()])
    assert t.full_step_ms == pytest.approx(t.measured["full_step_ms"])
    # exact at both ends, even when the tiny model's single skips are all within the timer's noise (CI saw that)
    assert t.fixed_ms == pytest.approx(min(t.measured["all_skipped_step_ms"], t.measured["full_step_ms"]))
    assert t.fixed_ms + sum(t.layer_ms.values()) == pytest.approx(t.full_step_ms)
    assert cache_path(tmp_path, key).is_file()


def _options(tmp_path, **kw):
    return SearchOptions(
        model="tiny:search", nfe=3, num_samples=16, population=6, generations=1, topk=2, mutants=2, crossovers=2,
        budget_fraction=0.8, report_samples=16, batch_size=16, out=str(tmp_path / "plan.json"), quiet=True,
        report_extractors=["search-tiny"], grid_points=8, dp_paths=2, holdout_samples=0, sensitivity_points=3,
        sensitivity_samples=8, latency_backend="torch", **kw,
    )


def test_latency_search_meets_its_budget_in_predicted_ms_and_records_it(tmp_path, search_tiny_model,
                                                                       search_tiny_extractor, search_tiny_ref_stats):
    """A table written to the cache beside the teacher is the search's compute: the plan's (and the report's)
    predicted ms is the table's sum over its skips, and it meets --budget-fraction of the full model's ms."""
    options = _options(tmp_path)
    key = resolve_key(search_tiny_model, "torch", "auto", 1, 1)
    ids = [layer.id for layer in search_tiny_model.unet.layers]
    # deliberately unlike MACs: the cheapest layer by MACs is the dearest here
    macs = {layer.id: layer.macs for layer in search_tiny_model.unet.layers}
    table = LatencyTable(key, 0.7, 0.3, {lid: 2.0 / (1 + macs[lid] / max(macs.values())) for lid in ids})
    path = cache_path(tmp_path / ".teacher-cache", key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table.to_json()))
    _, plan, report = run_search(options, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    lat = Plan.load(tmp_path / "plan.json").predicted_latency
    assert lat.ms == pytest.approx(table.predict_ms(plan.skip), abs=1e-3)
    assert lat.full_ms == pytest.approx(table.full_ms(3), abs=1e-3)
    assert lat.ms <= 0.8 * lat.full_ms + 1e-3 and plan.macs_per_sample < plan.full_macs_per_sample
    assert lat.key == {k: key[k] for k in ("backend", "precision", "batch", "threads", "cpu")}
    assert report.latency["rows"][0]["predicted_ms"] == pytest.approx(lat.ms, abs=1e-2)
    assert "Predicted latency per request (torch fp32" in (tmp_path / "plan.report.md").read_text()
    assert plan.provenance["summary"]["latency_table"]["key"] == key


def test_compute_macs_leaves_plans_as_they_were(tmp_path, search_tiny_model, search_tiny_extractor,
                                                search_tiny_ref_stats):
    options = replace(_options(tmp_path), compute="macs", report=False)
    _, plan, _ = run_search(options, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    d = json.loads((tmp_path / "plan.json").read_text())
    assert plan.predicted_latency is None and set(d["compute"]) == {"macs_per_sample", "full_macs_per_sample"}
    assert plan.macs_per_sample <= 0.8 * plan.full_macs_per_sample
    assert not list((tmp_path / ".teacher-cache").glob("latency-*"))  # nothing measured


def test_budget_macs_with_compute_latency_is_refused_naming_the_fix(tmp_path, search_tiny_model,
                                                                    search_tiny_extractor, search_tiny_ref_stats):
    from search.errors import SearchError

    with pytest.raises(SearchError, match="--budget-macs .* --compute macs"):
        run_search(replace(_options(tmp_path), budget_fraction=None, budget_macs=10**6), search_tiny_model,
                   search_tiny_extractor, search_tiny_ref_stats)


def test_plan_latency_fields_round_trip_and_bad_ones_are_named(search_tiny_model):
    from autodiffusion_rt.plan import PredictedLatency

    lat = PredictedLatency(3.5, 4.0, {"backend": "openvino", "precision": "bf16", "batch": 1, "threads": 1, "cpu": "X"})
    plan = Plan.for_model(search_tiny_model, [900, 500, 100], predicted_latency=lat)
    assert Plan.from_dict(plan.to_dict()) == plan
    plain = Plan.for_model(search_tiny_model, [900, 500, 100])
    assert "predicted_latency_ms" not in plain.to_dict()["compute"]  # older readers see the same file
    for change, needle in [({"predicted_latency_ms": -1.0}, "compute.predicted_latency_ms"),
                           ({"full_predicted_latency_ms": math.inf}, "compute.full_predicted_latency_ms"),
                           ({"latency_key": {"backend": "x"}}, "compute.latency_key"),
                           ({"latency_key": {**lat.key, "batch": 0}}, "compute.latency_key.batch")]:
        d = plan.to_dict()
        d["compute"].update(change)
        with pytest.raises(PlanError, match=needle.replace(".", r"\.")):
            Plan.from_dict(d)
    assert Candidate.full([1]).nfe == 1


def test_the_skip_verdict_compares_predicted_ms_not_macs_when_it_has_them():
    from search.pareto import FrontPoint, dominated_levels

    noskip = FrontPoint(Candidate.full([900, 500, 100]), "ddim", macs=300, holdout_fid=5.0, latency_ms=30.0)
    # fewer MACs but more ms (an attention-heavy skip set): does not beat the no-skip point in ms
    slow = FrontPoint(Candidate((900, 500, 100), (("a",), (), ())), "ddim", macs=200, holdout_fid=4.0, latency_ms=31.0)
    fast = FrontPoint(Candidate((900, 500, 100), (("b",), (), ())), "ddim", macs=310, holdout_fid=4.5, latency_ms=29.0)
    assert dominated_levels([noskip], [slow, fast], lambda p: p.holdout_fid) == [(noskip, fast)]
    in_macs = [replace(p, latency_ms=None) for p in (noskip, slow, fast)]
    assert dominated_levels(in_macs[:1], in_macs[1:], lambda p: p.holdout_fid) == [(in_macs[0], in_macs[1])]


def test_the_report_lists_only_the_rows_whose_predicted_latency_differs():
    """Uniform rows skip nothing: one line says their shared prediction; a plan that skips layers gets its row."""
    from search.report import _latency_section

    key = {"backend": "openvino", "precision": "bf16", "batch": 1, "threads": 1, "cpu": "cpu"}
    rows = [{"method": m, "sampler": "ddim", "predicted_ms": 13.861} for m in ("DDIM linear", "DDIM quadratic")]
    same = _latency_section({"key": key, "rows": [{"method": "searched plan", "sampler": "ddim", "predicted_ms": 13.86},
                                                  *rows]})
    assert "every row, 13.86 ms." in same and "|" not in same
    plan = {"method": "searched plan", "sampler": "unipc", "predicted_ms": 9.5}
    text = _latency_section({"key": key, "rows": [plan, *rows]})
    assert "every other row, 13.86 ms." in text and "| searched plan | unipc | 9.50 |" in text
    assert "DDIM linear" not in text
