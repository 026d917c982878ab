"""Where a request's time goes, from outside the server: gRPC's own round trip (an empty RPC) and the
server's per-stage statistics (KServe ModelStatistics, as deltas over a measured window)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import grpc

from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as pb_grpc

STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def empty_rpc_p50_ms(target: str, seconds: float) -> float:
    """Median round trip of ServerLive, which does no work: the transport's floor per call."""
    with grpc.insecure_channel(target) as channel:
        live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive
        live(pb.ServerLiveRequest(), timeout=10)
        latencies = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            live(pb.ServerLiveRequest(), timeout=10)
            latencies.append(time.perf_counter() - start)
    return statistics.median(latencies) * 1e3


def instance_count(target: str, model: str) -> int:
    """How many batches of ``model`` the server runs at once (KServe ModelConfig instance_group)."""
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            pb.ModelConfigRequest(name=model), timeout=10
        )
    return sum(group.count for group in reply.config.instance_group) or 1


def stage_totals(target: str, model: str) -> dict[str, tuple[int, int]]:
    """Per stage: (count, total ns) so far, summed over the model's served versions."""
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    totals = dict.fromkeys(STAGES, (0, 0))
    for stats in reply.model_stats:
        for stage in STAGES:
            duration = getattr(stats.inference_stats, stage)
            count, ns = totals[stage]
            totals[stage] = (count + duration.count, ns + duration.ns)
    return totals


def mean_stage_ms(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Mean milliseconds per request of each stage between two ``stage_totals``."""
    means = {}
    for stage in STAGES:
        count = after[stage][0] - before[stage][0]
        means[f"{stage}_ms"] = (after[stage][1] - before[stage][1]) / count / 1e6 if count else float("nan")
    return means
