"""The one place where the server's parts are built and wired together.

A grpc.aio server carries our fineserve.v1 service, the KServe v2 service, the standard health
service and reflection; a Prometheus HTTP server carries the metrics. Lifecycle: the port opens
with health NOT_SERVING (readiness: service "" and the two API services) and SERVING on the
``liveness`` service; every model the policy selects loads and warms up (or fails: it stays
FAILED, visible in the index and metrics), then readiness turns SERVING when the models are
ready as the ``readiness`` setting asks (``DataPlane.ready``), and follows them from then on; on
stop, every health service turns NOT_SERVING first, new calls are refused, in-flight calls get
``shutdown_grace_s`` to finish, then the models are released.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fineserve.server import malformed, security, shutdown
from fineserve.server.config import Settings
from fineserve.server.cuda_runtime import CudaRuntime
from fineserve.server.cuda_shared_memory import CudaSharedMemory
from fineserve.server.dataplane import DataPlane
from fineserve.server.grpc_api import FineserveServicer
from fineserve.server.health_watch import CappedHealthServicer
from fineserve.server.kserve import service as kserve
from fineserve.server.logs import configure_logging
from fineserve.server.metrics import Metrics
from fineserve.server.observe import Telemetry
from fineserve.server.open_files import raise_soft_limit, region_capacity
from fineserve.server.pb.fineserve.v1 import fineserve_pb2, fineserve_pb2_grpc
from fineserve.server.pb.inference import grpc_service_pb2
from fineserve.server.repository import Repository
from fineserve.server.runtime import CUDA, choose_provider
from fineserve.server.shared_memory import SharedMemoryRegistry
from fineserve.server.threads import DECODE_NAME, WORKER_NAME, name_thread

if TYPE_CHECKING:
    from fineserve.server.worker import WorkerRole

log = logging.getLogger(__name__)

FINESERVE_SERVICE = fineserve_pb2.DESCRIPTOR.services_by_name["Fineserve"].full_name
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Readiness: "" is the whole server, as health checkers ask by default.
HEALTH_SERVICES = ("", FINESERVE_SERVICE, KSERVE_SERVICE)
# Liveness: SERVING while the process runs and its event loop answers, loading or not; a probe
# that restarts pods must not follow readiness (a pod busy warming up is alive).
LIVENESS_SERVICE = "liveness"
__all__ = ["LIVENESS_SERVICE", "Server", "build_dataplane", "configure_logging", "serve"]
_GRPC_INT_MAX = 2**31 - 1
# On shutdown, gRPC stops once no call has run or been turned away for this long (or the grace ends).
_QUIET_S = 0.2


def build_dataplane(settings: Settings, metrics: Metrics | None = None) -> DataPlane:
    """The serving core and its parts: the execution provider, telemetry (metrics, request log,
    optional tracing), the image-decoding pool and the model repository, which decides each
    version's batching once as it loads it."""
    metrics = metrics or Metrics()
    choice = choose_provider(settings)
    provider = choice.provider
    metrics.provider.info({"provider": provider, "device": settings.device})
    metrics.device_fallback.set(1 if choice.fallback_reason else 0)
    log.info("execution provider: %s", provider)
    if provider != CUDA and settings.precision == "fp16":
        log.warning(
            "precision=fp16 on %s: the fp16 graphs run, slower than fp32 (they are made for CUDA); "
            "use it to check an fp16 graph without a GPU, not to serve",
            provider,
        )
    if provider == CUDA:
        metrics.enable_gpu()
    tracer = None
    if settings.tracing != "off":
        from fineserve.server.tracing import RequestTracer  # imports OpenTelemetry: only when asked for

        tracer = RequestTracer.from_setting(settings.tracing)
    telemetry = Telemetry(metrics, settings.log_slow_request_ms, tracer)
    # Batches run on each model version's own threads (server/model.py). Image decoding has a
    # pool of its own, so a batch run never waits behind decoding, and vice versa.
    image_pool = concurrent.futures.ThreadPoolExecutor(
        settings.preprocess_threads or os.cpu_count() or 1,
        thread_name_prefix="decode",
        initializer=name_thread,
        initargs=(DECODE_NAME,),
    )
    repository = Repository(settings, provider, metrics, image_pool)
    return DataPlane(settings, repository, telemetry, image_pool)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC port's limits (docs/reliability.md, Limits of the gRPC port)."""
    return [
        ("grpc.max_receive_message_length", settings.grpc_max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        # gRPC reads 0 as "at once" for the connection ages; our 0 is "never": INT_MAX is gRPC's own.
        ("grpc.max_connection_idle_ms", _ms_or_never(settings.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms_or_never(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", round(settings.grpc_max_connection_age_grace_s * 1000)),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            round(settings.grpc_min_client_ping_interval_s * 1000),
        ),
        ("grpc.http2.max_ping_strikes", settings.grpc_max_ping_strikes),
        # Pings on a connection with no call open are allowed (at the interval above): clients that
        # keep idle connections alive through NATs are not cut off for it.
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _ms_or_never(seconds: float) -> int:
    return min(round(seconds * 1000), _GRPC_INT_MAX) if seconds > 0 else _GRPC_INT_MAX


class Server:
    """The assembled server. ``start`` returns once models are loaded and the ports are bound.

    As one of ``--workers N`` processes (``worker``), it binds the shared gRPC port only once its
    models are loaded (connections the kernel hands it never wait on a load), replays the other
    workers' load and unload calls first, and its health waits for every worker (server/worker.py).
    """

    def __init__(self, settings: Settings, worker: WorkerRole | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = Metrics()
        self.dataplane = build_dataplane(settings, self.metrics)
        tokens = security.Tokens.from_settings(settings)
        refused = self.metrics.call_refused
        self._gate = shutdown.ShutdownGate(on_refused=refused)
        self.grpc = grpc.aio.server(
            # Tokens are checked first: an unauthenticated request is never parsed, and gets
            # UNAUTHENTICATED even while shutting down. Each refusal is counted once, as answered.
            interceptors=[
                security.AuthInterceptor(tokens, on_refused=refused),
                self._gate,
                malformed.MalformedRequestInterceptor(
                    in_band_streams=kserve.IN_BAND_STREAMS, on_refused=refused
                ),
            ],
            options=grpc_options(settings),
        )
        fineserve_pb2_grpc.add_FineserveServicer_to_server(FineserveServicer(self.dataplane), self.grpc)
        # Each system shared memory region keeps a descriptor open: regions get only what the
        # open-files limit, raised first, leaves after a reserve (server/open_files.py).
        open_files = raise_soft_limit()
        self.shared_memory = SharedMemoryRegistry(
            settings.system_shared_memory,
            max_regions=region_capacity(open_files.soft),
            max_read_bytes=settings.max_receive_message_bytes,
            cuda=CudaSharedMemory(
                settings.cuda_shared_memory,
                load=functools.partial(CudaRuntime.load, settings.cuda_runtime_library),
            ),
        )
        self.metrics.watch_shared_memory(self.shared_memory.counts, self.shared_memory.max_regions)
        self._log_shared_memory()
        kserve.add_to_server(self.grpc, self.dataplane, settings, self.shared_memory, self._gate.stopping)
        self.health = CappedHealthServicer(settings.max_health_watches)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (FINESERVE_SERVICE, KSERVE_SERVICE, health_service, reflection.SERVICE_NAME), self.grpc
        )
        credentials = security.server_credentials(settings)
        self.grpc_port = 0
        if worker is None:
            self._bind()
        tls = "off" if credentials is None else "mutual" if settings.tls_require_client_cert else "on"
        log.info("gRPC security: TLS %s; %s", tls, tokens.describe())
        if settings.tls_cert_file is not None:
            self.metrics.watch_certificate(security.certificate_validity(settings.tls_cert_file).not_after)
        for what in security.open_control(settings, tokens):
            log.warning(
                "gRPC listens on %s with no token: anyone who reaches it may %s", settings.grpc_host, what
            )
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self._stopping = False
        self._serving = False
        self._health_set = False
        self.dataplane.on_ready_change = self._follow_readiness
        if worker is not None:
            worker.attach(self.dataplane)

    def _bind(self) -> None:
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = security.server_credentials(self.settings)
        try:
            if credentials is None:
                self.grpc_port = self.grpc.add_insecure_port(address)
            else:
                self.grpc_port = self.grpc.add_secure_port(address, credentials)
        except RuntimeError:  # newer grpc raises where older returned port 0
            self.grpc_port = 0
        if not self.grpc_port:
            raise OSError(
                f"cannot bind gRPC to {address} (grpc_host, grpc_port): the port is in use, or the "
                "address is not one of this host's"
            )

    def _log_shared_memory(self) -> None:
        kinds = [
            kind
            for kind, on in (
                ("system", self.settings.system_shared_memory),
                ("CUDA", self.settings.cuda_shared_memory),
            )
            if on
        ]
        if kinds:
            log.info(
                "%s shared memory on: at most %d regions", " and ".join(kinds), self.shared_memory.max_regions
            )
        if self.settings.cuda_shared_memory and self.shared_memory.cuda is not None:
            why = self.shared_memory.cuda.probe()
            if why is not None:
                log.warning("cuda_shared_memory is on, but registering will fail: %s", why)

    async def start(self) -> None:
        # Blocking work (tokenising, model loading) runs on named threads; the event loop is this
        # thread. Both for the per-role CPU metric and for top -H (server/threads.py).
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(
                thread_name_prefix="worker", initializer=name_thread, initargs=(WORKER_NAME,)
            )
        )
        self.metrics.thread_cpu.loop_tid = threading.get_native_id()
        await self._set_health(serving=False)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.worker is None:
            await self.grpc.start()
            log.info("gRPC listening on port %d (health NOT_SERVING until models are ready)", self.grpc_port)
        if self.settings.metrics_port >= 0:
            host, port = self.settings.metrics_host, self.settings.metrics_port
            try:
                self._metrics_server, self.metrics_port = self.metrics.serve(
                    host,
                    port,
                    max_connections=self.settings.metrics_max_connections,
                    timeout_s=self.settings.metrics_timeout_s,
                )
            except OSError as err:
                why = err.strerror or err
                raise OSError(
                    f"cannot serve metrics on {host}:{port} (metrics_host, metrics_port): {why}"
                ) from None
            if self.worker is None:
                log.info("metrics on http://%s:%d/metrics", self.settings.metrics_host, self.metrics_port)
            else:
                self.worker.pool.write_metrics_port(self.worker.index, self.metrics_port)
        await self.dataplane.start()
        if self.worker is not None:
            await self.worker.catch_up()
            self._bind()
            await self.grpc.start()
            log.info(
                "worker %d (pid %d) loaded its models and joined gRPC port %d",
                self.worker.index,
                os.getpid(),
                self.grpc_port,
            )
            self.worker.own_ready(self.dataplane.ready())
            self.worker.start(self._refresh_health)
        serving = self.dataplane.ready()
        await self._set_health(serving=serving)
        failed = sorted({e.name for e in self.dataplane.index() if e.state == "FAILED"})
        failures = f" (failed to load: {', '.join(failed)})" if failed else ""
        if serving and not self._serving:  # a worker whose siblings are still loading
            log.info("worker ready%s; health SERVING once every worker is ready", failures)
        elif serving:
            log.info("server ready: SERVING%s", failures)
        else:
            log.error(
                "server started but NOT_SERVING: the models are not ready as readiness=%s asks%s",
                self.settings.readiness,
                failures,
            )

    async def _follow_readiness(self, serving: bool) -> None:
        """Health follows the models as they load, fail and unload after startup."""
        if self._stopping:
            return
        if self.worker is not None:
            self.worker.own_ready(serving)
        try:
            await self._set_health(serving=serving)
        except Exception:  # the repository poll that called this must go on
            log.exception("could not set health to %s", "SERVING" if serving else "NOT_SERVING")
            return
        log.warning(
            "health %s: readiness=%s", "SERVING" if serving else "NOT_SERVING", self.settings.readiness
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, let in-flight ones finish, release models."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining in-flight requests (grace %.1f s)", grace)
        self._gate.close()
        if self.worker is not None:
            self.worker.begin_stop()
        await self.health.enter_graceful_shutdown()
        # New calls are refused with UNAVAILABLE by the gate while the accepted ones finish, and
        # until callers go quiet; only then does gRPC stop (waiting out what remains of the grace
        # for calls still open). A call that reaches gRPC after its stop is CANCELLED unrun.
        # Quiet counts from the last refusal and from the last request in flight: a caller whose
        # answer has just gone out sends its next call at once, and it must meet the gate.
        drain_until = time.monotonic() + grace
        last_busy = time.monotonic()
        while (now := time.monotonic()) < drain_until:
            if self._requests_in_flight():
                last_busy = now
            elif now - max(last_busy, self._gate.last_refused) >= _QUIET_S:
                break
            await asyncio.sleep(0.01)
        await self.grpc.stop(max(0.0, drain_until - time.monotonic()))
        if self.worker is not None:
            await self.worker.stop()  # after the drain: its statistics include the last requests
        await self.dataplane.close()
        self.shared_memory.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("server stopped")

    def _requests_in_flight(self) -> int:
        served = self.dataplane.repository.served
        return sum(version.in_flight for versions in served.values() for version in versions.values())

    async def _refresh_health(self) -> None:
        """A worker's health follows its siblings' readiness too (called as the pool is polled)."""
        if not self._stopping:
            await self._set_health(serving=self.dataplane.ready())

    async def _set_health(self, serving: bool) -> None:
        if self.worker is not None:
            serving = self.worker.serving(serving)
        if serving == self._serving and self._health_set:
            return
        self._serving, self._health_set = serving, True
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)


async def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    """Runs the server until SIGTERM or SIGINT, then stops it gracefully."""
    server = Server(settings, worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)  # release the port and threads before the error surfaces
        raise
    await stop.wait()
    await server.stop()
