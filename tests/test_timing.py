"""Ratios taken round by round and pooled over processes (compile_sparse.timing, bench/kv_speed_pooled.py)."""

import importlib.util
import statistics
from pathlib import Path

import pytest

from compile_sparse.timing import paired_ratio, ratio_summary, round_ratios


def _load_pooled():
    path = Path(__file__).resolve().parents[1] / "bench" / "kv_speed_pooled.py"
    spec = importlib.util.spec_from_file_location("kv_speed_pooled", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pooled


def test_round_ratios_pair_rounds_and_refuse_unequal_lengths():
    assert round_ratios([2.0, 9.0, 4.0], [1.0, 3.0, 8.0]) == [2.0, 3.0, 0.5]
    with pytest.raises(ValueError):
        round_ratios([1.0, 2.0], [1.0])


def test_ratio_summary_is_median_and_quartile_spread():
    ratios = [1.0, 1.2, 0.9, 1.1, 1.0, 1.4, 0.8, 1.05]
    summary = ratio_summary(ratios)
    ordered = sorted(ratios)
    assert summary["ratio"] == statistics.median(ratios)
    assert summary["spread"] == pytest.approx((ordered[6] - ordered[2]) / statistics.median(ratios))


def test_paired_ratio_cancels_a_drift_that_hits_both_sides():
    drift = [1.0, 2.0, 0.5, 3.0, 1.5]  # the machine's speed, round by round
    times = {"a": {"rounds_ms": [110.0 * d for d in drift]}, "b": {"rounds_ms": [100.0 * d for d in drift]}}
    result = paired_ratio(times, "a", "b")
    assert result["ratio"] == pytest.approx(1.1)
    assert result["spread"] == pytest.approx(0.0, abs=1e-12)


def test_pooled_takes_every_round_of_every_process():
    pooled = _load_pooled()

    def run(sparse, ideal, dense):
        return {"decode": [{"method": "h2o", "batch": 1, "rounds_ms": {"sparse": sparse, "ideal": ideal, "dense": dense}}]}

    runs = [run([100.0, 120.0, 90.0], [100.0, 100.0, 100.0], [200.0, 240.0, 180.0]),
            run([105.0, 106.0, 130.0], [100.0, 100.0, 100.0], [210.0, 212.0, 260.0])]
    [row] = pooled(runs)
    all_ratios = [1.0, 1.2, 0.9, 1.05, 1.06, 1.3]  # pooled median 1.055; the processes' medians 1.0 and 1.06
    assert (row["method"], row["batch"], row["processes"], row["rounds"]) == ("h2o", 1, 2, 6)
    assert row["vs_ideal"] == pytest.approx(statistics.median(all_ratios))
    assert row["vs_ideal"] != pytest.approx(statistics.median(row["process_medians"]["vs_ideal"]))
    assert row["speedup"] == pytest.approx(2.0)
    assert row["process_medians"]["vs_ideal"] == pytest.approx([1.0, 1.06])
    assert row["between_processes"] == pytest.approx(0.06 / statistics.median(all_ratios))
