"""The KServe v2 / Open Inference Protocol gRPC service (grpc.aio), over the core's DataPlane.

Each RPC converts the request (the modules of this package), calls the DataPlane, converts the
reply. Exceptions become statuses in ``server.grpc_status`` (``@grpc_errors``); in a stream, a
failed request answers with ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from typing_extensions import override

from fineserve.server.cuda_shared_memory import CudaRegion
from fineserve.server.errors import InvalidInput, ServingError
from fineserve.server.grpc_status import cancelled_of, deadline_of, grpc_errors, headers_of, to_status
from fineserve.server.kserve.input_checks import EncodedRequest, check_declared_inputs, check_inputs
from fineserve.server.kserve.inputs import decode_inputs
from fineserve.server.kserve.interface import PROBABILITIES, ModelInterface, interface_of
from fineserve.server.kserve.model_config import model_config, model_metadata, version_policy
from fineserve.server.kserve.outputs import check_output_regions, requested_outputs, select_outputs
from fineserve.server.kserve.parameters import (
    check_no_load_parameters,
    check_repository_name,
    check_request_parameters,
    deadline,
    parse_version,
)
from fineserve.server.kserve.replies import encode_outputs
from fineserve.server.kserve.statistics import model_statistics
from fineserve.server.malformed import UnparsableRequest
from fineserve.server.message_limits import check_message_size
from fineserve.server.pb.inference import grpc_service_pb2 as pb
from fineserve.server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from fineserve.server.shared_memory import NO_SHARED_MEMORY, Region, SharedMemoryRegistry

if TYPE_CHECKING:
    from fineserve.server.config import Settings
    from fineserve.server.dataplane import DataPlane, ModelHandle

SERVER_NAME = "fineserve"
SHUTTING_DOWN = "the server is shutting down; retry elsewhere"
# Request streams whose unparsable messages are answered in band (server/malformed.py).
IN_BAND_STREAMS = frozenset(
    {f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelStreamInfer"}
)
# Only what this server really does: top-k classification outputs, repository index/load/unload,
# ModelConfig, ModelStatistics, raw (binary) tensor contents, request parameters (``timeout``).
EXTENSIONS = (
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "parameters",
)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _server_version() -> str:
    try:
        return importlib.metadata.version("fineserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        settings: Settings,
        shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._dataplane = dataplane
        # Set when the server starts shutting down: open streams stop taking requests and end.
        self._stopping = stopping or asyncio.Event()
        self._settings = settings
        self._version = _server_version()
        self._shared_memory = shared_memory
        cuda = shared_memory.cuda
        cuda_works = cuda is not None and cuda.enabled and cuda.probe() is None
        self._extensions = [
            *EXTENSIONS,
            *(["system_shared_memory"] if shared_memory.enabled else []),
            *(["cuda_shared_memory"] if cuda_works else []),
        ]

    # --- health and metadata --------------------------------------------------------------------

    @override
    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dataplane.live())

    @override
    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    @override
    @grpc_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=self._extensions)

    @override
    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        # An unknown model is "not ready", not an error (as the protocol's servers answer).
        version = parse_version(request.version)
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(request.name, version))

    @override
    @grpc_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        handle = self._resolve(request.name, request.version)
        return model_metadata(handle.name, handle.versions, self._interface(handle))

    @override
    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        handle = self._resolve(request.name, request.version)
        config = model_config(handle, self._interface(handle))
        config.version_policy.CopyFrom(version_policy(self._settings, handle.name))
        return pb.ModelConfigResponse(config=config)

    @override
    @grpc_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        version = parse_version(request.version)
        if version is not None and not request.name:
            raise InvalidInput("a model version needs a model name")
        stats = self._dataplane.statistics(request.name or None, version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(s) for s in stats])

    # --- inference ------------------------------------------------------------------------------

    @override
    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    @override
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they can share batches) and each answers when it is done,
        a failed one with ``error_message`` while the stream goes on; ``id`` pairs them up.

        At most ``max_queue_size`` (of the request's model) requests of one stream are in flight
        or answered but not yet sent: past that the stream stops reading, and gRPC flow control
        slows the client down instead of memory filling up, however slowly the client reads.

        When the server starts shutting down, requests read from then on are answered at once
        with ``error_message`` "the server is shutting down" (never run); once the requests
        accepted before have been answered, the stream ends with UNAVAILABLE.
        """
        responses: asyncio.Queue[pb.ModelStreamInferResponse | _Drained | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        # Requests read and not yet sent back; a slot frees only once its answer has been written.
        unsent = 0
        slot_freed = asyncio.Condition()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                result = await self._infer(request, context)
                responses.put_nowait(pb.ModelStreamInferResponse(infer_response=result))
            except Exception as err:
                _, message = to_status(err)
                responses.put_nowait(_error_reply(request, message))

        async def take_slot(limit: int) -> None:
            nonlocal unsent
            async with slot_freed:
                while unsent >= limit:
                    await slot_freed.wait()
                unsent += 1

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    if isinstance(request, UnparsableRequest):
                        # Not a message of its type: answered in band, and the stream reads on.
                        await take_slot(self._settings.max_queue_size)
                        responses.put_nowait(pb.ModelStreamInferResponse(error_message=request.message))
                        continue
                    if self._stopping.is_set():
                        await take_slot(self._settings.max_queue_size)
                        responses.put_nowait(_error_reply(request, SHUTTING_DOWN))
                        continue
                    await take_slot(self._queue_size(request))
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*running)
            finally:
                responses.put_nowait(None)

        async def end_when_drained() -> None:
            await self._stopping.wait()
            while running:  # the requests accepted before shutdown get their answers
                await asyncio.wait(set(running))
            responses.put_nowait(_Drained())

        reader = asyncio.create_task(read_all())
        drained = asyncio.create_task(end_when_drained())
        try:
            while (response := await responses.get()) is not None:
                if isinstance(response, _Drained):
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{SHUTTING_DOWN}: this stream's requests sent before it are answered; "
                        "those without an answer were not run",
                    )
                    return  # (abort raises)
                # grpc.aio asks for the next response only after this one is written out.
                yield response
                async with slot_freed:
                    unsent -= 1
                    slot_freed.notify_all()
            await reader
        finally:
            reader.cancel()
            drained.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        # The declared rows, for counting items of requests that fail before their inputs are read;
        # clamped so a bogus shape cannot inflate the counter.
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 0
        items = min(max(rows, 0), self._settings.max_items_per_request)
        with self._dataplane.observe(request.model_name, items=items, headers=headers_of(context)):
            return await self._infer_observed(request, context)

    async def _infer_observed(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        check_message_size(self._settings, request.model_name, request)
        until = deadline(request.parameters, deadline_of(context))
        is_cancelled = cancelled_of(context)
        check_request_parameters(request.parameters)
        version = parse_version(request.model_version)
        handle = self._dataplane.resolve(request.model_name, version)
        interface = self._interface(handle)
        wanted = requested_outputs(request, interface)
        check_declared_inputs(request, interface, handle.name)
        form = check_inputs(interface, handle.name, decode_inputs(request, self._shared_memory))
        check_output_regions(wanted, interface, form.batch_size, self._shared_memory)
        # The request's version (None = newest) goes to the core, not the resolved one: a newer
        # version swapped in meanwhile then serves the request instead of failing it.
        if isinstance(form, EncodedRequest):
            result = await self._dataplane.infer_encoded(
                request.model_name, version, form.items, deadline=until, is_cancelled=is_cancelled
            )
        else:
            result = await self._dataplane.infer(
                request.model_name, version, form.inputs, deadline=until, is_cancelled=is_cancelled
            )
        outputs = dict(result.outputs)
        if any(w.name == PROBABILITIES for w in wanted):
            outputs[PROBABILITIES] = result.probabilities()
        response = pb.ModelInferResponse(
            model_name=result.handle.name, model_version=str(result.handle.version), id=request.id
        )
        selected = select_outputs(outputs, wanted, result.handle.spec.labels)
        encode_outputs(selected, wanted, response, self._shared_memory)
        return response

    # --- repository -----------------------------------------------------------------------------

    @override
    @grpc_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        check_repository_name(request.repository_name)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=str(e.version), state=e.state, reason=e.reason
                )
                for e in self._dataplane.index()
                if not request.ready or e.state == "READY"
            ]
        )

    @override
    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        check_repository_name(request.repository_name)
        check_no_load_parameters(request.parameters)
        await self._dataplane.load(request.model_name, deadline_of(context))
        return pb.RepositoryModelLoadResponse()

    @override
    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        check_repository_name(request.repository_name)
        # tritonclient always sends unload_dependents; with no ensembles it changes nothing.
        check_no_load_parameters({k: v for k, v in request.parameters.items() if k != "unload_dependents"})
        await self._dataplane.unload(request.model_name, deadline_of(context))
        return pb.RepositoryModelUnloadResponse()

    # --- system shared memory -------------------------------------------------------------------

    @override
    @grpc_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._shared_memory.status(request.name, "system"):
            assert isinstance(region, Region)
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    @override
    @grpc_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @override
    @grpc_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._shared_memory.unregister(request.name, "system")
        return pb.SystemSharedMemoryUnregisterResponse()

    # --- CUDA shared memory ---------------------------------------------------------------------

    @override
    @grpc_errors
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for region in self._shared_memory.status(request.name, "cuda"):
            assert isinstance(region, CudaRegion)
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size
                )
            )
        return response

    @override
    @grpc_errors
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self._shared_memory.register_cuda(
            request.name, request.raw_handle, request.device_id, request.byte_size
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @override
    @grpc_errors
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self._shared_memory.unregister(request.name, "cuda")
        return pb.CudaSharedMemoryUnregisterResponse()

    # --- helpers --------------------------------------------------------------------------------

    def _resolve(self, name: str, version: str) -> ModelHandle:
        return self._dataplane.resolve(name, parse_version(version))

    def _interface(self, handle: ModelHandle) -> ModelInterface:
        return interface_of(handle.spec, max_batch_size=handle.batching.max_batch_size)

    def _queue_size(self, request: pb.ModelInferRequest) -> int:
        """A stream's bound on unsent requests: the queue size of the request's model version;
        one that does not resolve fails at once, within the server-wide bound."""
        try:
            return self._resolve(request.model_name, request.model_version).batching.max_queue_size
        except ServingError:
            return self._settings.max_queue_size


class _Drained:
    """In a stream's reply queue: shutdown began and every accepted request has been answered."""


def _error_reply(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A stream's answer to a request that failed or was not run: its id, model and the reason."""
    failed = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)


def add_to_server(
    server: grpc.aio.Server,
    dataplane: DataPlane,
    settings: Settings,
    shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY,
    stopping: asyncio.Event | None = None,
) -> None:
    """Registers the KServe v2 service on ``server``; ``stopping`` is set when shutdown begins."""
    servicer = KServeServicer(dataplane, settings, shared_memory, stopping)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
