"""ModelStats as KServe ModelStatistics (``server/kserve/statistics.py``)."""

from __future__ import annotations

from fineserve.server.kserve.statistics import model_statistics


def test_model_statistics_conversion() -> None:
    from fineserve.server.model import BatchStats, Duration, ModelStats

    stats = ModelStats(
        name="m",
        version=2,
        last_inference_ms=123,
        inference_count=5,
        execution_count=2,
        success=Duration(3, 300),
        fail=Duration(1, 10),
        queue=Duration(3, 30),
        compute_input=Duration(3, 1),
        compute_infer=Duration(3, 2),
        compute_output=Duration(3, 3),
        batch_stats=(BatchStats(4, Duration(1, 4), Duration(1, 5), Duration(1, 6)),),
    )
    out = model_statistics(stats)
    assert (out.name, out.version, out.last_inference, out.inference_count, out.execution_count) == (
        "m",
        "2",
        123,
        5,
        2,
    )
    assert (out.inference_stats.success.count, out.inference_stats.success.ns) == (3, 300)
    assert out.inference_stats.fail.count == 1 and out.inference_stats.compute_output.ns == 3
    assert out.batch_stats[0].batch_size == 4 and out.batch_stats[0].compute_infer.ns == 5
