"""The server's one typed settings object, validated at startup.

Sources, highest precedence first: command-line flags (passed as keyword arguments), environment
variables prefixed ``FINESERVE_`` (e.g. ``FINESERVE_GRPC_PORT=9001``; lists and maps as JSON), a
YAML file (``--config FILE`` or ``FINESERVE_CONFIG_FILE``), then the defaults below. Every field
has its documentation under it: ``docs/serving.md`` and ``--help`` are made from these.
Rules that involve several fields are checked here, in the model, not where the values are used.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic_settings
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fineserve.server.batching import Batching

ENV_PREFIX = "FINESERVE_"

Device = Literal["auto", "cuda", "cpu"]
PrecisionChoice = Literal["auto", "fp32", "fp16", "int8"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
ConvAlgoSearch = Literal["auto", "EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
Switch = Literal["auto", "on", "off"]
VersionPolicy = Literal["latest", "all", "specific"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


# Past these a value is a typo, not a tuning: a batch delay of minutes, a thousand threads a model.
MAX_QUEUE_DELAY_MS = 10_000.0
MAX_INSTANCES = 64
MAX_WORKERS = 256
# The spellings pydantic takes for a boolean (case aside): io_binding was one.
_BOOLEAN_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_BOOLEAN_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


class ModelBatching(BaseModel):
    """One model's batching settings; a field left unset takes the server-wide value."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    max_batch_size: int | None = Field(default=None, ge=1)
    """Cap on rows per batch for this model."""
    max_queue_delay_ms: float | None = Field(default=None, ge=0, le=MAX_QUEUE_DELAY_MS)
    """How long this model's first request of a batch waits for others."""
    preferred_batch_sizes: list[int] | None = None
    """Batch sizes that run at once for this model."""
    max_queue_size: int | None = Field(default=None, ge=1)
    """Requests waiting for this model before RESOURCE_EXHAUSTED."""
    instances: int | None = Field(default=None, ge=0, le=MAX_INSTANCES)
    """Batches of this model that run at once (0: measured at load, as the server-wide 0)."""
    inline_run_us: float | None = Field(default=None, ge=0, le=10_000)
    """This model's limit for running a lone request on the event loop (0: never)."""


class Settings(BaseSettings):
    """Everything the server can be told; one instance is built at startup and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        allow_inf_nan=False,  # an infinite delay or grace period is a typo that fails later
    )

    config_file: Path | None = None
    """A YAML file of settings (keys are the field names below); flags and environment win over it."""

    # --- where and what -------------------------------------------------------------------------
    model_repository: Path = Path("models")
    """The model repository folder: ``<model>/<version>/model.json`` plus graph files."""
    grpc_host: str = "[::]"
    """Address the gRPC server binds to (``[::]`` = every interface, IPv4 and IPv6)."""
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """gRPC port for both services (fineserve.v1 and KServe v2); 0 picks a free port."""
    metrics_host: str = "0.0.0.0"
    """Address the Prometheus metrics HTTP server binds to."""
    metrics_port: int = Field(default=8002, ge=-1, le=65535)
    """Prometheus metrics port (``/metrics``); 0 picks a free port, -1 turns metrics serving off."""
    metrics_max_connections: int = Field(default=32, ge=1)
    """Metrics HTTP connections served at once, each on its own thread; one more is answered 503
    and closed at once (a scraper needs one)."""
    metrics_timeout_s: float = Field(default=10.0, gt=0)
    """A metrics HTTP connection that sends nothing for this long (a half-sent request, an idle
    keep-alive) is closed, freeing its thread."""

    workers: int | Literal["auto"] = 1
    """Serving processes behind the one gRPC port (SO_REUSEPORT; docs/serving.md, "Worker
    processes"), each loading the repository, with one ``/metrics`` for all of them. 1: one process,
    no supervisor. ``auto``: on CPU ``cores // max(2, intra_op_threads + 1)`` (a core for each
    worker's event loop and at least one for its inference; at least 1 worker), on CUDA
    ``min(cores, 4)`` front ends for the one device (not measured yet); the log says what it
    picked. Each worker gets its own share of the cores (CPU affinity), so the auto thread counts
    below divide the cores between workers instead of each taking all of them."""

    # --- execution providers and sessions -------------------------------------------------------
    device: Device = "auto"
    """``auto``: CUDA when onnxruntime offers it and a one-node graph runs on it at startup, else
    CPU (logged; a failed probe also sets fineserve_device_fallback). ``cuda``: working CUDA or
    refuse to start. ``cpu``: CPU only."""
    precision: PrecisionChoice = "auto"
    """Which graph variant of model.json to serve. ``auto``: fp16 on CUDA, int8 if present on CPU
    when ``prefer_int8_on_cpu`` is set, else fp32. A named variant the model lacks falls back to
    fp32, with a warning. ``fp16`` on CPU runs (onnxruntime's CPU provider runs our fp16 graphs,
    slower than fp32) with a startup warning: it is for checking the fp16 graph without a GPU."""
    prefer_int8_on_cpu: bool = False
    """With ``precision=auto`` on CPU, serve the int8 variant where a model has one."""
    instances: int = Field(default=0, ge=0, le=MAX_INSTANCES)
    """Batches of one model version that run at once, each on its own thread. The instances share
    the version's one onnxruntime session (one copy of the weights) and its thread pool. 0 = auto:
    on CPU each version measures, at load, one instance over every core against two side by side
    and keeps two only where they answer a lone request as fast (within 5%) and serve 5% more
    under load (on the 2-core benchmark machine: two for the 64 px EfficientNet models, one for
    the 224 px one and for MiniLM; docs/performance.md); on CUDA 1 (more, where runs may share a
    device stream, is not measured)."""
    intra_op_threads: int = Field(default=0, ge=0)
    """onnxruntime intra-op threads of each version's session (its caller's thread included),
    shared by the version's instances. 0 = auto: on CPU ``cores - instances + 1``, so that all
    instances running at once use every core once (cores: the CPU affinity, capped by a cgroup v2
    CPU quota); on CUDA onnxruntime's default."""
    inter_op_threads: int = Field(default=0, ge=0)
    """onnxruntime threads across independent operators; 0 lets onnxruntime choose."""
    intra_op_spinning: bool = False
    """CPU provider only: while a batch runs, its onnxruntime threads spin-wait between operators
    instead of sleeping and being woken for each one, and stop the moment the run ends. With one
    busy model it cuts latency and CPU per run; with several models busy at once their runs'
    spinning threads crowd each other out, so it is off by default (measured in docs/performance.md)."""
    graph_optimization: GraphOptimization = "all"
    """onnxruntime graph optimisation level."""
    cuda_mem_limit_bytes: int = Field(default=0, ge=0)
    """CUDA arena memory limit per session in bytes; 0 = no limit."""
    cudnn_conv_algo_search: ConvAlgoSearch = "auto"
    """cuDNN convolution algorithm search. EXHAUSTIVE times every algorithm once per input shape
    (fastest runs, slowest first run of each shape), HEURISTIC picks from cuDNN's rules, DEFAULT
    takes the first. ``auto``: EXHAUSTIVE where batches are padded (``pad_batches``: the few
    shapes are each searched once, at warmup), HEURISTIC where every new batch size would pay it."""
    io_binding: Switch = "auto"
    """Run batches through onnxruntime IO binding: inputs bound from the host arrays, outputs left
    on the device and copied to the host once per batch. ``auto``: on with CUDA, off on CPU (where
    both are the same work); ``on`` binds on CPU too. onnxruntime's Python API offers no pinned
    host buffers, so host copies are from and to pageable memory."""
    cuda_graph: Switch = "auto"
    """CUDA graphs: each padded batch size is captured once at warmup, in input and output buffers
    of its own, and replayed for every batch of that size, which cuts the launch cost of each
    kernel. Needs fixed shapes and bound buffers: padded batches, IO binding, and inputs fixed past
    the batch axis (image models; a text model's sequence length varies, so it runs without,
    logged). ``auto``: on where those hold on CUDA, and a model whose graph onnxruntime cannot
    capture runs without (logged); ``on``: that model fails to load instead."""

    # --- dynamic batching -----------------------------------------------------------------------
    max_batch_size: int = Field(default=64, ge=1)
    """Cap on rows per batch; a model's own ``max_batch_size`` from model.json applies if lower."""
    max_queue_delay_ms: float = Field(default=2.0, ge=0, le=MAX_QUEUE_DELAY_MS)
    """How long the first request of a batch waits for others to join it (at most 10 s)."""
    batch_wait: Literal["adaptive", "fixed"] = "adaptive"
    """``adaptive``: the delay is only waited out while more requests for the model are being
    preprocessed, so a lone request runs at once (under load batches still grow while the previous
    batch runs); ``fixed``: always wait up to ``max_queue_delay_ms`` (Triton's behaviour)."""
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Batch sizes worth running at once without waiting out the delay (e.g. ``[8, 16]``)."""
    inline_run_us: float = Field(default=100.0, ge=0, le=10_000)
    """A model version whose recent runs took at most this long (a moving average, in µs, times the
    request's rows) runs a request that finds nobody to batch with on the event loop itself:
    handing it to a batching thread and back costs the loop more than such a run
    (docs/performance.md, "Runs on the loop"). On CPU and with ``batch_wait=adaptive`` only; 0:
    every request goes through the batching threads."""
    max_queue_size: int = Field(default=128, ge=1)
    """Requests queued per model version; one more is rejected at once with RESOURCE_EXHAUSTED."""
    batching: dict[str, ModelBatching] = Field(default_factory=dict)
    """Per-model batching overrides: model name -> any of max_batch_size, max_queue_delay_ms,
    preferred_batch_sizes, max_queue_size, instances, inline_run_us (config file or environment as
    JSON)."""

    pad_batches: Literal["auto", "on", "off"] = "auto"
    """Pad each batch with zero rows up to the next power of two (or the maximum batch size) so
    onnxruntime sees only a few shapes, each warmed up at load. ``auto``: on with CUDA, where every
    new shape costs a slow first run; off on CPU, where padding only costs compute."""
    sequence_buckets: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256, 512])
    """With padded batches, the token lengths a text model's batches are padded to (attention
    mask 0 on the added positions): those below the model's ``max_length``, and ``max_length``
    itself. Every batch size x length is warmed up at load, so each length costs one warmup run
    per batch size. ``[]``: texts are padded only to the longest of their batch, as unpadded."""

    # --- limits on requests ---------------------------------------------------------------------
    max_image_pixels: int = Field(default=25_000_000, ge=1)
    """Largest image (width x height) decoded; checked from the header, before decoding."""
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    """Largest total of encoded items (images or texts) in one request."""
    max_items_per_request: int = Field(default=256, ge=1)
    """Most images or texts in one request."""
    max_text_chars: int = Field(default=10_000, ge=1)
    """Longest text, in characters, before tokenisation."""
    preprocess_threads: int = Field(default=0, ge=0)
    """Threads that decode and resize images; 0 = one per CPU core."""

    # --- repository -----------------------------------------------------------------------------
    repository_poll_s: float = Field(default=5.0, ge=0)
    """How often the repository is scanned for new versions; 0 turns polling off."""
    version_policy: VersionPolicy = "latest"
    """Which versions are served: the newest ``latest_versions``, ``all``, or ``specific_versions``."""
    latest_versions: int = Field(default=1, ge=1)
    """With ``version_policy=latest``: how many of the newest versions are served."""
    specific_versions: dict[str, list[int]] = Field(default_factory=dict)
    """With ``version_policy=specific``: model name -> the versions to serve."""
    readiness: Literal["any", "all"] = "any"
    """When health and KServe ServerReady say SERVING, once the first load has settled: ``any``:
    a model the version policy selects has a READY version (a server whose models all failed is
    never SERVING); ``all``: every one has (Triton's strict readiness). With nothing selected (an
    empty repository, every model unloaded) it is SERVING. ``any`` is the default because
    replicas share one repository: under ``all`` one broken model takes every replica out of
    service, the healthy models with it. Re-checked as models load, fail and unload."""
    allow_model_control: bool = True
    """Allow the explicit load/unload RPCs; when off they answer PERMISSION_DENIED."""
    warmup: bool = True
    """Run each version once on synthetic input before it is marked ready."""

    # --- transport ------------------------------------------------------------------------------
    system_shared_memory: bool = False
    """KServe system shared memory: clients on this host may register /dev/shm regions and pass
    tensors through them instead of the socket. Off: the RPCs answer PERMISSION_DENIED. A
    registered region is read and written by the server, so enable it only where every client
    that can reach the port may use this host's shared memory. Registering regions is management:
    with tokens on it needs the admin token, and only objects of the server's user are taken."""
    cuda_shared_memory: bool = False
    """KServe CUDA shared memory: clients on this host register GPU allocations by their CUDA IPC
    handle and pass tensors through them (copied to and from the host). Off: the RPCs answer
    PERMISSION_DENIED; on without a usable CUDA device: registering answers FAILED_PRECONDITION.
    Registering regions is management, as for system shared memory."""
    cuda_runtime_library: str | None = None
    """The libcudart CUDA shared memory loads (a path or a soname), and no other; unset: the one
    the nvidia wheels in site-packages bring (as torch loads it), else the system's."""
    max_receive_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest request message a model accepts (gRPC checks it before parsing). 32 MiB holds the
    largest request the exported models take at their default max batch (32 rows of a 224 px
    float32 image tensor: 18.4 MiB) and ``max_request_bytes`` of encoded items; every byte of a
    message is held in memory until it is answered, so raise it per model where needed."""
    max_receive_message_bytes_per_model: dict[str, int] = Field(default_factory=dict)
    """Per-model overrides of ``max_receive_message_bytes``: model name -> bytes (config file or
    environment as JSON). gRPC accepts the largest of all; a model's request over its own limit
    gets RESOURCE_EXHAUSTED once parsed."""
    max_send_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest gRPC message the server sends."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    """On SIGTERM: how long in-flight requests get to finish before they are cancelled."""
    grpc_max_concurrent_streams: int = Field(default=1024, ge=1)
    """Calls one client connection may have open at once (HTTP/2 streams); more wait in the
    client for a free one, but a burst past it can be refused UNAVAILABLE (256 calls in flight on
    one connection against a cap of 100 lost more than half of them: docs/reliability.md), so it
    sits well above what one client keeps in flight."""
    grpc_max_connection_idle_s: float = Field(default=600.0, ge=0)
    """A connection with no call open for this long is closed (GOAWAY; clients reconnect when
    they next call); 0: never."""
    grpc_max_connection_age_s: float = Field(default=0.0, ge=0)
    """Connections are closed (GOAWAY) after this long, so clients re-resolve and spread over
    new replicas; calls then open get ``grpc_max_connection_age_grace_s`` to finish. 0: never
    (a ModelStreamInfer stream may then run as long as its client wants)."""
    grpc_max_connection_age_grace_s: float = Field(default=30.0, ge=0)
    """How long calls open on a connection past its ``grpc_max_connection_age_s`` may finish."""
    grpc_min_client_ping_interval_s: float = Field(default=10.0, ge=0)
    """Keepalive enforcement: a client that pings more often than this gets a strike; after
    ``grpc_max_ping_strikes`` its connection is closed (GOAWAY too_many_pings)."""
    grpc_max_ping_strikes: int = Field(default=2, ge=0)
    """Pings too soon that a connection may send before it is closed; 0: unlimited."""
    max_health_watches: int = Field(default=1000, ge=1)
    """Health ``Watch`` streams open at once (they are open to anyone, token or not); one more
    gets RESOURCE_EXHAUSTED. Each holds a few KiB for as long as its client keeps it open."""

    # --- security (docs/reliability.md) ---------------------------------------------------------
    tls_cert_file: Path | None = None
    """PEM certificate chain of the server; with ``tls_key_file`` the gRPC port speaks TLS only."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle that client certificates are checked against (mutual TLS)."""
    tls_require_client_cert: bool = False
    """Mutual TLS: refuse clients without a certificate signed by ``tls_client_ca_file``."""
    tls_expiry_warning_days: float = Field(default=14.0, ge=0)
    """Log a WARNING at startup when ``tls_cert_file`` expires within this many days (an expired or
    not yet valid one refuses to start); the metric ``fineserve_tls_certificate_expiry_seconds``
    counts down to it for alerts."""
    inference_token: SecretStr | None = None
    """Bearer token every inference and metadata call must carry (``authorization: Bearer ...``
    metadata); unset: no token needed. Prefer the environment or ``inference_token_file`` to a flag,
    which other users can read in the process list."""
    inference_token_file: Path | None = None
    """A file holding ``inference_token`` (surrounding whitespace ignored)."""
    admin_token: SecretStr | None = None
    """Bearer token for model management (KServe RepositoryModelLoad/Unload); unset: management
    needs what inference needs (the inference token, if set)."""
    admin_token_file: Path | None = None
    """A file holding ``admin_token`` (surrounding whitespace ignored)."""

    # --- logging --------------------------------------------------------------------------------
    log_level: LogLevel = "INFO"
    """Log level of the server's own loggers."""
    log_json: bool = False
    """Same as ``log_format=json`` (kept for existing configurations)."""
    log_format: Literal["text", "json"] = "text"
    """``text`` lines, or ``json``: one JSON object per line, request fields at the top level."""
    log_slow_request_ms: float = Field(default=1000.0, ge=0)
    """Successful requests slower than this (end to end, in the server) are logged as WARNING with
    their id, model, version and stage timings; failed requests always are. 0 logs every request."""

    # --- tracing --------------------------------------------------------------------------------
    tracing: Literal["off", "console", "otlp"] = "off"
    """OpenTelemetry spans per inference request (queue, preprocessing, inference). ``console``
    prints them, ``otlp`` exports with the standard ``OTEL_EXPORTER_OTLP_*`` variables. Needs the
    ``otel`` extra; off, nothing of OpenTelemetry is imported."""

    @field_validator("io_binding", mode="before")
    @classmethod
    def _io_binding_was_a_boolean(cls, value: Any) -> Any:
        # It was a boolean setting: every spelling pydantic took for one still works
        # (FINESERVE_IO_BINDING=1/yes/true/on, ``io_binding: false``, ``io_binding: 0``).
        if isinstance(value, bool | int) and value in (0, 1):
            return "on" if value else "off"
        if isinstance(value, str):
            spelled = value.strip().lower()
            if spelled in _BOOLEAN_TRUE:
                return "on"
            if spelled in _BOOLEAN_FALSE:
                return "off"
        return value

    @property
    def json_logs(self) -> bool:
        return self.log_json or self.log_format == "json"

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, workers: int | str) -> int | str:
        if isinstance(workers, int) and not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"must be 1..{MAX_WORKERS} or 'auto', not {workers}")
        return workers

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        for name in ["", *self.batching]:
            batching = self.batching_for(name)
            too_big = [b for b in batching.preferred_batch_sizes if not 1 <= b <= batching.max_batch_size]
            if too_big:
                where = f"batching.{name}." if name else ""
                raise ValueError(
                    f"{where}preferred_batch_sizes {too_big} must each be in 1..max_batch_size "
                    f"({batching.max_batch_size})"
                )
        if any(n < 1 for n in self.sequence_buckets):
            raise ValueError(f"sequence_buckets {self.sequence_buckets} must each be at least 1")
        too_small = {m: b for m, b in self.max_receive_message_bytes_per_model.items() if b < 1024}
        if too_small:
            raise ValueError(f"max_receive_message_bytes_per_model {too_small}: each must be >= 1024")
        if self.max_request_bytes > self.max_receive_message_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) cannot exceed "
                f"max_receive_message_bytes ({self.max_receive_message_bytes})"
            )
        if self.version_policy == "specific" and not self.specific_versions:
            raise ValueError("version_policy 'specific' needs specific_versions (model -> versions)")
        if self.version_policy != "specific" and self.specific_versions:
            raise ValueError("specific_versions is set but version_policy is not 'specific'")
        if self.grpc_port and self.grpc_port == self.metrics_port:
            raise ValueError(f"grpc_port and metrics_port are both {self.grpc_port}")
        _check_security(self)
        if self.device == "cuda" and self.precision == "int8":
            raise ValueError("precision 'int8' runs on the CPU provider only; use device 'cpu' or 'auto'")
        if self.tracing != "off":
            _check_tracing_installed(self.tracing)
        _check_cuda_graph(self)
        return self

    def max_receive_message_bytes_for(self, model: str) -> int:
        """The largest request message ``model`` accepts."""
        return self.max_receive_message_bytes_per_model.get(model, self.max_receive_message_bytes)

    @property
    def grpc_max_receive_message_bytes(self) -> int:
        """What gRPC itself accepts: the largest of the per-model limits."""
        return max([self.max_receive_message_bytes, *self.max_receive_message_bytes_per_model.values()])

    def batching_for(self, model: str) -> Batching:
        """The batching settings for ``model``: its overrides over the server-wide values, the
        queue delay in seconds (the one place its milliseconds are read)."""
        override = self.batching.get(model, ModelBatching())
        preferred = override.preferred_batch_sizes
        delay_ms = override.max_queue_delay_ms
        if delay_ms is None:
            delay_ms = self.max_queue_delay_ms
        inline_us = self.inline_run_us if override.inline_run_us is None else override.inline_run_us
        return Batching(
            max_batch_size=override.max_batch_size or self.max_batch_size,
            max_queue_delay_s=delay_ms / 1000,
            preferred_batch_sizes=tuple(self.preferred_batch_sizes if preferred is None else preferred),
            max_queue_size=override.max_queue_size or self.max_queue_size,
            instances=self.instances if override.instances is None else override.instances,
            inline_run_s=inline_us / 1e6,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) beat the environment, which beats the YAML file, which beats defaults.
        assert isinstance(init_settings, InitSettingsSource)
        return init_settings, env_settings, _YamlFileSource(settings_cls, init_settings)


def _check_cuda_graph(settings: Settings) -> None:
    """``cuda_graph=on`` only where a graph can be captured: CUDA, fixed batch shapes, bound buffers."""
    if settings.cuda_graph != "on":
        return
    if settings.device == "cpu":
        raise ValueError("cuda_graph 'on' needs CUDA; with device 'cpu' leave it 'auto' or 'off'")
    if settings.pad_batches == "off":
        raise ValueError(
            "cuda_graph 'on' needs fixed shapes: pad_batches 'on' or 'auto' (one graph per batch size)"
        )
    if settings.io_binding == "off":
        raise ValueError("cuda_graph 'on' needs bound buffers: io_binding 'on' or 'auto'")


def _check_security(settings: Settings) -> None:
    """TLS files come as a usable set; each token comes from one place; named files are readable."""
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
    if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
        raise ValueError("tls_client_ca_file needs TLS: set tls_cert_file and tls_key_file")
    if settings.tls_require_client_cert and settings.tls_client_ca_file is None:
        raise ValueError("tls_require_client_cert needs tls_client_ca_file to check client certificates")
    for name in ("inference_token", "admin_token"):
        if getattr(settings, name) is not None and getattr(settings, f"{name}_file") is not None:
            raise ValueError(f"set {name} or {name}_file, not both")
        if getattr(settings, name) is not None and not getattr(settings, name).get_secret_value().strip():
            raise ValueError(f"{name} is empty; leave it unset to switch the token off")
    for name in (
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "inference_token_file",
        "admin_token_file",
    ):
        path: Path | None = getattr(settings, name)
        if path is not None and not path.is_file():
            raise ValueError(f"{name}: {path} is not a readable file")
    for name in ("inference_token_file", "admin_token_file"):
        path = getattr(settings, name)
        if path is not None:
            try:
                read_token_file(path)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None


def read_token_file(path: Path) -> str:
    """A bearer token from its file, whitespace stripped.

    Raises:
        ValueError: unreadable (a secret mounted with the wrong owner, say), not UTF-8, or empty;
            the message starts with the path.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    if not token:
        raise ValueError(f"{path} is empty")
    return token


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by the ``config_file`` flag or ``FINESERVE_CONFIG_FILE``."""

    def __init__(self, settings_cls: type[BaseSettings], init_settings: InitSettingsSource) -> None:
        super().__init__(settings_cls)
        path = init_settings.init_kwargs.get("config_file") or os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
        self._values = _read_yaml(Path(path)) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SettingsError(f"config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise SettingsError(f"config file {path}: not valid YAML ({_yaml_problem(err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping of setting names to values")
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"config file {path}: unknown settings {', '.join(map(str, unknown))}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message quotes the file over several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else str(problem)


def _check_tracing_installed(exporter: str) -> None:
    # Checked here so a missing package is a one-line startup error, not a failure at first request.
    needed = {"console": "opentelemetry.sdk", "otlp": "opentelemetry.exporter.otlp.proto.grpc"}[exporter]
    try:
        found = importlib.util.find_spec(needed) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        package = "opentelemetry-sdk" if exporter == "console" else "opentelemetry-exporter-otlp-proto-grpc"
        raise ValueError(f"tracing '{exporter}' needs the {package} package: pip install 'fineserve[otel]'")


# FINESERVE_* variables that belong to the project's other programs, not to the server.
OTHER_PROGRAMS_VARIABLES = frozenset({"FINESERVE_DATA_CACHE", "FINESERVE_HEALTH_ADDRESS"})


# What Kubernetes puts in every pod for a Service named "fineserve" (deploy/k8s/service.yaml):
# FINESERVE_SERVICE_HOST, FINESERVE_SERVICE_PORT_GRPC, FINESERVE_PORT_8001_TCP_ADDR, ...
_SERVICE_LINKS = re.compile(r"^FINESERVE_(SERVICE_(HOST|PORT)\w*|PORT(_\d+_(TCP|UDP|SCTP)\w*)?)$")


def unknown_environment_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``FINESERVE_*`` variables that name no setting (a typo is otherwise silently ignored)."""
    return sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX)
        and name not in OTHER_PROGRAMS_VARIABLES
        and not _SERVICE_LINKS.match(name)
        and name[len(ENV_PREFIX) :].lower() not in Settings.model_fields
    )


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the setting and says why (one line each)."""


def load_settings(**overrides: Any) -> Settings:
    """Builds the settings from flags (``overrides``, None values ignored), environment and file.

    Raises:
        SettingsError: an unreadable config file or a value out of its rules; the message lists
            every problem, one per line, each naming its setting.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as err:
        raise SettingsError(_describe(err)) from None
    except pydantic_settings.SettingsError as err:
        # A list or map from the environment that is not JSON (FINESERVE_PREFERRED_BATCH_SIZES=abc).
        raise SettingsError(f"{err} (lists and maps in the environment are JSON: '[8, 16]')") from None


def _describe(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(x) for x in problem["loc"]) or "settings"
        lines.append(f"{where}: {problem['msg']}")
    return "\n".join(lines)
