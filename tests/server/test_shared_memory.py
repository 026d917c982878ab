"""KServe system shared memory: the registry on its own, then end to end through tritonclient.

The end-to-end tests run the real server with ``--system-shared-memory`` and tritonclient's own
shared-memory API in the harness's child process (``kserve_harness.shm_infer``): regions made
with ``tritonclient.utils.shared_memory``, registered, named by inputs and requested outputs.
Each answer is compared with the same request sent the usual way, through the socket. Objects
made here are unlinked at the end of each test, so /dev/shm is left as it was found.
"""

from __future__ import annotations

import base64
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fineserve.bench.server_process import ServerProcess
from fineserve.server.cuda_runtime import CudaRuntime
from fineserve.server.cuda_shared_memory import CudaSharedMemory
from fineserve.server.errors import (
    AlreadyExists,
    DeviceUnavailable,
    InvalidInput,
    PermissionDenied,
    RegionLimitReached,
    RegionNotFound,
)
from fineserve.server.shared_memory import SharedMemoryRegistry
from tests.fixtures import (
    TINY_IMAGE_SIZE,
    MakeObject,
    publish_tiny_image_model,
    publish_tiny_text_model,
    unique_name,
)
from tests.server.kserve_harness import Triton, TritonError, connected, running_server

IMAGE = "tiny-image"
TEXT = "tiny-text"
RNG = np.random.default_rng(11)
# A libcudart that does not load: CUDA shared memory without a usable device, on every host (a GPU
# host's real device would answer the tests' fake handles with INVALID_ARGUMENT instead).
NO_LIBCUDART = "/nonexistent/libcudart.so"

# Makes a shared-memory object of a size: its key and its bytes.


unique = unique_name


# --- the registry, over plain files (root=tmp_path) -----------------------------------------------


def test_registry_register_status_and_unregister(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(bytes(range(256)))
    registry = SharedMemoryRegistry(enabled=True, root=tmp_path)
    try:
        registry.register("a", "/obj", 16, 64)
        registry.register("b", "obj", 0, 256)  # the leading slash is optional
        assert [(r.name, r.key, r.offset, r.byte_size) for r in registry.status("")] == [
            ("a", "/obj", 16, 64),
            ("b", "obj", 0, 256),
        ]
        assert [r.name for r in registry.status("b")] == ["b"]
        # A region reads its own bytes: offset 16 of the object is offset 0 of "a".
        assert bytes(registry.get("a", "x").read(4, 8, "x")) == bytes(range(20, 28))
        registry.get("a", "x").write(0, b"\xff\xfe", 4, "x")
        assert (tmp_path / "obj").read_bytes()[14:20] == bytes([14, 15, 0xFF, 0xFE, 18, 19])
        with pytest.raises(AlreadyExists, match="'a' is already registered") as taken:
            registry.register("a", "/obj", 0, 8)
        assert taken.value.status == "ALREADY_EXISTS"
        with pytest.raises(RegionNotFound, match="'c' is not registered") as missing:
            registry.status("c")
        assert missing.value.status == "NOT_FOUND"
        with pytest.raises(InvalidInput, match="where: shared memory region 'c' is not registered"):
            registry.get("c", "where")
        registry.unregister("c")  # unknown: not an error
        registry.unregister("a")
        assert [r.name for r in registry.status("")] == ["b"]
        registry.register("a", "/obj", 0, 8)  # the name is free again
        registry.unregister("")
        assert registry.status("") == []
    finally:
        registry.close()


@pytest.mark.parametrize(
    ("key", "offset", "byte_size", "message"),
    [
        ("/nope", 0, 8, "'/nope': no such shared-memory object"),
        ("/../x", 0, 8, "is not a POSIX shared-memory name"),
        ("/a/b", 0, 8, "is not a POSIX shared-memory name"),
        ("/..", 0, 8, "is not a POSIX shared-memory name"),
        ("/.", 0, 8, "is not a POSIX shared-memory name"),
        ("", 0, 8, "is not a POSIX shared-memory name"),
        ("/obj", 0, 0, "byte_size must be > 0"),
        ("/obj", 250, 8, r"offset 250 \+ byte_size 8 is past the end of '/obj' \(256 bytes\)"),
        ("/obj", 0, 257, "past the end"),
        ("/empty", 0, 1, "the object is empty"),
        ("/link", 0, 8, "'/link': cannot open it"),  # a symbolic link is not followed
        ("/dir", 0, 8, "'/dir': cannot open it"),
    ],
)
def test_registry_refuses_bad_regions(
    tmp_path: Path, key: str, offset: int, byte_size: int, message: str
) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    (root / "obj").write_bytes(bytes(256))
    (root / "empty").touch()
    (root / "dir").mkdir()
    (tmp_path / "outside").write_bytes(bytes(256))
    (root / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "x").write_bytes(bytes(256))  # what "/../x" would reach
    registry = SharedMemoryRegistry(enabled=True, root=root)
    with pytest.raises(InvalidInput, match=message):
        registry.register("r", key, offset, byte_size)
    assert registry.status("") == []


def test_registry_takes_only_the_servers_own_objects_and_no_semaphores(tmp_path: Path) -> None:
    # A server running as root could open any user's object; it must not write into another
    # user's programs' memory for a client. glibc keeps named semaphores in /dev/shm as sem.NAME.
    (tmp_path / "obj").write_bytes(bytes(64))
    (tmp_path / "sem.lock").write_bytes(bytes(64))
    someone_else = os.geteuid() + 1
    stranger = SharedMemoryRegistry(enabled=True, root=tmp_path, owner_uid=someone_else)
    with pytest.raises(InvalidInput, match=f"belongs to uid {os.geteuid()}, not to the server's user"):
        stranger.register("r", "/obj", 0, 8)
    assert stranger.status("") == []
    registry = SharedMemoryRegistry(enabled=True, root=tmp_path)
    try:
        with pytest.raises(InvalidInput, match="is not a POSIX shared-memory name"):
            registry.register("r", "/sem.lock", 0, 8)
        registry.register("r", "/obj", 0, 8)  # its own user's object
        assert registry.counts() == {"system": 1, "cuda": 0}
    finally:
        registry.close()


def test_system_and_cuda_regions_share_one_namespace_and_one_cap(tmp_path: Path) -> None:
    """As in Triton: a name is taken whatever its kind; status and unregister see one kind. The
    name and cap are checked before the CUDA device, which is made unusable here on any host."""
    (tmp_path / "obj").write_bytes(bytes(64))
    no_cuda = CudaSharedMemory(enabled=True, load=functools.partial(CudaRuntime.load, NO_LIBCUDART))
    registry = SharedMemoryRegistry(enabled=True, max_regions=2, root=tmp_path, cuda=no_cuda)
    try:
        registry.register("a", "/obj", 0, 8)
        with pytest.raises(AlreadyExists, match="'a' is already registered"):
            registry.register_cuda("a", bytes(64), 0, 8)
        with pytest.raises(
            DeviceUnavailable, match="CUDA shared memory needs a CUDA device: the libcudart named by"
        ) as no_gpu:
            registry.register_cuda("b", bytes(64), 0, 8)
        assert no_gpu.value.status == "FAILED_PRECONDITION"
        with pytest.raises(InvalidInput, match="raw_handle has 10 bytes; a cudaIpcMemHandle_t has 64"):
            registry.register_cuda("b", bytes(10), 0, 8)
        assert registry.status("", "cuda") == []
        with pytest.raises(RegionNotFound, match="cuda shared memory region 'a' is not registered"):
            registry.status("a", "cuda")
        registry.unregister("", "cuda")  # drops CUDA regions only
        registry.unregister("a", "cuda")  # a system region: not this kind's to drop
        assert [r.name for r in registry.status("", "system")] == ["a"]
        registry.register("b", "/obj", 8, 8)
        with pytest.raises(RegionLimitReached):  # the cap counts both kinds, before the device
            registry.register_cuda("c", bytes(64), 0, 8)
    finally:
        registry.close()
    off = SharedMemoryRegistry(enabled=True, root=tmp_path)
    with pytest.raises(PermissionDenied, match="CUDA shared memory is disabled"):
        off.register_cuda("a", bytes(64), 0, 8)


def test_an_object_truncated_after_registering_is_refused_not_faulted(tmp_path: Path) -> None:
    # Touching a mapped page past the object's end would kill the server with SIGBUS.
    (tmp_path / "obj").write_bytes(bytes(8192))
    registry = SharedMemoryRegistry(enabled=True, root=tmp_path)
    try:
        registry.register("r", "/obj", 0, 8192)
        region = registry.get("r", "x")
        assert region.read(4096, 8, "input 'a'") == bytes(8)
        os.truncate(tmp_path / "obj", 100)
        with pytest.raises(InvalidInput, match="smaller than when it was registered"):
            region.read(4096, 8, "input 'a'")
        with pytest.raises(InvalidInput, match="smaller than when it was registered"):
            region.write(4096, b"12345678", 8, "requested output 'b'")
        assert region.read(0, 100, "input 'a'") == bytes(100)  # what is still there reads fine
        with pytest.raises(InvalidInput, match="offset >= 0"):
            registry.register("negative", "/obj", -8, 8)
    finally:
        registry.close()


def test_an_object_shrinking_while_it_is_read_is_an_error_not_a_crash(tmp_path: Path) -> None:
    # A client may truncate its object at any moment, between the size check and the copy too.
    # Through a mapping, that copy would touch pages past the end and this process would die of
    # SIGBUS; the region reads through the descriptor, so the worst case is a short read.
    size = 1 << 20
    (tmp_path / "obj").write_bytes(bytes(size))
    registry = SharedMemoryRegistry(enabled=True, root=tmp_path)
    stop = threading.Event()

    def shrink_and_grow() -> None:
        while not stop.is_set():
            os.truncate(tmp_path / "obj", 4096)
            os.truncate(tmp_path / "obj", size)

    flipper = threading.Thread(target=shrink_and_grow)
    try:
        registry.register("r", "/obj", 0, size)
        region = registry.get("r", "x")
        flipper.start()
        outcomes = {"read": 0, "refused": 0}
        for _ in range(2000):
            try:
                assert len(region.read(0, size, "input 'a'")) == size
                outcomes["read"] += 1
            except InvalidInput as err:
                assert "smaller than when it was registered" in str(err)
                outcomes["refused"] += 1
        assert outcomes["refused"] > 0  # the race was really run
    finally:
        stop.set()
        if flipper.is_alive():
            flipper.join()
        registry.close()


def test_registry_refuses_bad_names_and_too_many_regions(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(bytes(64))
    registry = SharedMemoryRegistry(enabled=True, max_regions=2, root=tmp_path)
    for name in ("", "a b", "a/b", "x" * 129):
        with pytest.raises(InvalidInput, match="shared memory region name"):
            registry.register(name, "/obj", 0, 8)
    registry.register("r1", "/obj", 0, 8)
    registry.register("r2", "/obj", 8, 8)
    # Past the cap the open-files limit set: RESOURCE_EXHAUSTED, with what to do about it.
    with pytest.raises(RegionLimitReached, match="at most 2 shared memory regions") as full:
        registry.register("r3", "/obj", 16, 8)
    assert full.value.status == "RESOURCE_EXHAUSTED" and "unregister some first" in full.value.message
    registry.close()
    assert registry.status("") == []


def test_disabled_registry_refuses_everything(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(bytes(64))
    registry = SharedMemoryRegistry(enabled=False, root=tmp_path)
    calls: dict[str, Callable[[], Any]] = {
        "register": lambda: registry.register("r", "/obj", 0, 8),
        "status": lambda: registry.status(""),
        "unregister": lambda: registry.unregister(""),
        "get": lambda: registry.get("r", "x"),
    }
    for what, call in calls.items():
        with pytest.raises(PermissionDenied) as caught:
            call()
        assert caught.value.status == "PERMISSION_DENIED", what


# --- end to end: the real server and tritonclient --------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("shm") / "models"
    publish_tiny_image_model(repository)
    publish_tiny_text_model(repository)
    flags = ["--system-shared-memory", "--cuda-shared-memory", "--cuda-runtime-library", NO_LIBCUDART]
    with running_server(repository, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def triton(server: ServerProcess) -> Iterator[Triton]:
    with connected(server) as client:
        yield client


@pytest.fixture
def clean_status(triton: Triton) -> Iterator[None]:
    """Every test starts and ends with no region registered (and leaves none behind)."""
    assert regions(triton) == {}
    yield
    triton.call("unregister_system_shared_memory")


def regions(triton: Triton, name: str = "") -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = triton.call("get_system_shared_memory_status", name, as_json=True).get(
        "regions", {}
    )
    return found


def strings(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].shape == array.shape, name
        np.testing.assert_allclose(got[name], array, rtol=0, atol=1e-6, err_msg=name)


def test_server_metadata_lists_system_shared_memory(triton: Triton) -> None:
    extensions = triton.call("get_server_metadata", as_json=True)["extensions"]
    assert "system_shared_memory" in extensions and "statistics" in extensions
    # CUDA shared memory is on, but its libcudart does not load (no usable device): not offered.
    assert "cuda_shared_memory" not in extensions


@pytest.mark.usefixtures("clean_status")
def test_cuda_shared_memory_through_tritonclient_on_a_host_without_cuda(
    triton: Triton, shm_objects: MakeObject
) -> None:
    """tritonclient's own calls (it base64-decodes the handle it is given): registering needs a
    CUDA device (the server's ``cuda_runtime_library`` does not load, on any host) and says so;
    status and unregister answer as Triton's do."""
    handle = base64.b64encode(bytes(range(64)))  # what cuda_shared_memory.get_raw_handle returns
    with pytest.raises(TritonError) as no_device:
        triton.call("register_cuda_shared_memory", unique("gpu"), handle, 0, 1024)
    assert no_device.value.code == "FAILED_PRECONDITION", no_device.value
    assert "CUDA shared memory needs a CUDA device: the libcudart named by" in no_device.value.message
    with pytest.raises(TritonError) as short:
        triton.call("register_cuda_shared_memory", unique("gpu"), base64.b64encode(b"x" * 10), 0, 1024)
    assert short.value.code == "INVALID_ARGUMENT" and "raw_handle has 10 bytes" in short.value.message
    assert triton.call("get_cuda_shared_memory_status", as_json=True).get("regions", {}) == {}
    with pytest.raises(TritonError) as unknown:
        triton.call("get_cuda_shared_memory_status", unique("nope"))
    assert unknown.value.code == "NOT_FOUND", unknown.value
    triton.call("unregister_cuda_shared_memory", unique("never"))  # unknown: fine
    triton.call("unregister_cuda_shared_memory")  # all: fine
    # One namespace with system regions: a system region's name is taken for CUDA too, and is
    # not a CUDA region's status; unregistering CUDA regions leaves it be.
    key, _ = shm_objects(64)
    name = unique("both")
    triton.call("register_system_shared_memory", name, key, 64)
    with pytest.raises(TritonError) as taken:
        triton.call("register_cuda_shared_memory", name, handle, 0, 64)
    assert taken.value.code == "ALREADY_EXISTS", taken.value
    with pytest.raises(TritonError) as other_kind:
        triton.call("get_cuda_shared_memory_status", name)
    assert other_kind.value.code == "NOT_FOUND", other_kind.value
    triton.call("unregister_cuda_shared_memory")
    assert set(regions(triton)) == {name}


@pytest.mark.usefixtures("clean_status")
def test_image_tensors_in_and_logits_out_through_shared_memory(triton: Triton) -> None:
    batch = RNG.normal(size=(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)
    plain = triton.infer(IMAGE, [("pixel_values", "FP32", batch)], outputs=["logits", "probabilities"])
    prefix = unique("image")
    # 64 bytes set aside for logits [3, 3] FP32 (36 bytes); probabilities come back raw.
    answer = triton.shm_infer(
        IMAGE, [("pixel_values", "FP32", batch, True)], [("logits", 64), ("probabilities", 0)], prefix
    )
    assert_same(answer["outputs"], plain.outputs)
    assert np.abs(answer["outputs"]["logits"]).max() > 0.1  # not the zeroed region read back
    assert answer["parameters"] == {
        "logits": {"shared_memory_region": f"{prefix}_out", "shared_memory_byte_size": 36},
        "probabilities": {},
    }
    # logits keeps its (empty) raw entry, so probabilities' raw data stays at its own index.
    assert answer["raw_sizes"] == {"logits": 0, "probabilities": 36}
    assert regions(triton) == {}  # shm_infer unregistered its regions


@pytest.mark.usefixtures("clean_status")
def test_text_bytes_input_through_shared_memory(triton: Triton) -> None:
    texts = strings(b"good movie, I love the plot", "awful… boring ☹".encode(), b"the")
    plain = triton.infer(TEXT, [("texts", "BYTES", texts)])
    answer = triton.shm_infer(
        TEXT, [("texts", "BYTES", texts, True)], [("logits", 0), ("probabilities", 0)], unique("texts")
    )
    assert_same(answer["outputs"], plain.outputs)
    probabilities = answer["outputs"]["probabilities"]
    assert probabilities[0, 1] > 0.5 > probabilities[1, 1]
    assert answer["raw_sizes"] == {"logits": 24, "probabilities": 24}
    # Sent as a column, as clients written for Triton send strings.
    column = triton.shm_infer(
        TEXT, [("texts", "BYTES", texts.reshape(3, 1), True)], [("logits", 0)], unique("column")
    )
    assert_same(column["outputs"], {"logits": plain.outputs["logits"]})


@pytest.mark.usefixtures("clean_status")
def test_regions_registered_at_an_offset_with_one_input_raw(triton: Triton) -> None:
    """input_ids in shared memory, attention_mask raw; both regions registered 3 bytes into their
    objects (unaligned for INT64 and FP32); both outputs in one output region, one after the other."""
    ids = np.array([[2, 4, 12, 3, 0], [2, 8, 9, 15, 3]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    plain = triton.infer(TEXT, [("input_ids", "INT64", ids), ("attention_mask", "INT64", mask)])
    prefix = unique("text")
    answer = triton.shm_infer(
        TEXT,
        [("input_ids", "INT64", ids, True), ("attention_mask", "INT64", mask, False)],
        [("probabilities", 16), ("logits", 40)],
        prefix,
        region_offset=3,
    )
    assert_same(answer["outputs"], plain.outputs)
    assert answer["parameters"]["logits"] == {
        "shared_memory_region": f"{prefix}_out",
        "shared_memory_byte_size": 16,
        "shared_memory_offset": 16,
    }
    assert answer["raw_sizes"] == {"probabilities": 0, "logits": 0}
    # The status the client saw while the regions were registered (uint64 fields are JSON strings).
    assert answer["status"] == {
        f"{prefix}_in": {"name": f"{prefix}_in", "key": f"/{prefix}_in", "offset": "3", "byte_size": "80"},
        f"{prefix}_out": {"name": f"{prefix}_out", "key": f"/{prefix}_out", "offset": "3", "byte_size": "56"},
    }


@pytest.mark.usefixtures("clean_status")
def test_register_status_and_their_errors(triton: Triton, shm_objects: MakeObject) -> None:
    key, _ = shm_objects(256)
    name = unique("region")
    triton.call("register_system_shared_memory", name, key, 64, offset=16)
    triton.call("register_system_shared_memory", name + "_all", key, 256)
    expected = {"name": name, "key": key, "offset": "16", "byte_size": "64"}
    assert regions(triton, name) == {name: expected}
    assert regions(triton) == {
        name: expected,
        name + "_all": {"name": name + "_all", "key": key, "byte_size": "256"},  # offset 0: left out
    }
    failures: dict[str, tuple[Any, ...]] = {
        "ALREADY_EXISTS": ("register_system_shared_memory", name, key, 8),
        "INVALID_ARGUMENT": ("register_system_shared_memory", unique("other"), "/" + unique("nope"), 8),
        "NOT_FOUND": ("get_system_shared_memory_status", unique("nope")),
    }
    for code, (method, *args) in failures.items():
        with pytest.raises(TritonError) as caught:
            triton.call(method, *args)
        assert caught.value.code == code, caught.value
    for bad_key in ("/../x", "/a/b"):
        with pytest.raises(TritonError) as refused:
            triton.call("register_system_shared_memory", unique("bad"), bad_key, 8)
        assert refused.value.code == "INVALID_ARGUMENT" and "is not a POSIX shared-memory name" in str(
            refused.value
        )
    assert set(regions(triton)) == {name, name + "_all"}  # the refused ones are not registered
    triton.call("unregister_system_shared_memory", unique("never"))  # unknown: fine
    triton.call("unregister_system_shared_memory", name)
    assert set(regions(triton)) == {name + "_all"}


@pytest.mark.usefixtures("clean_status")
def test_a_region_past_the_objects_end_is_invalid(triton: Triton, shm_objects: MakeObject) -> None:
    key, _ = shm_objects(256)
    with pytest.raises(TritonError) as past_end:
        triton.call("register_system_shared_memory", unique("big"), key, 64, offset=200)
    assert past_end.value.code == "INVALID_ARGUMENT", past_end.value
    assert "offset 200 + byte_size 64 is past the end" in past_end.value.message
    assert regions(triton) == {}


@pytest.mark.usefixtures("clean_status")
def test_unregister_all_empties_the_status(triton: Triton, shm_objects: MakeObject) -> None:
    key, _ = shm_objects(128)
    names = [unique(f"r{i}") for i in range(3)]
    for i, name in enumerate(names):
        triton.call("register_system_shared_memory", name, key, 32, offset=32 * i)
    assert set(regions(triton)) == set(names)
    triton.call("unregister_system_shared_memory")
    assert regions(triton) == {}
    triton.call("register_system_shared_memory", names[0], key, 32)  # its name is free again
    assert set(regions(triton)) == {names[0]}


def shm_request(region: str, byte_size: int, output_region: str = "") -> dict[str, Any]:
    """tiny-image with pixel_values [1, 3, 8, 8] in ``region``; logits in ``output_region`` if set."""
    params = {
        "shared_memory_region": {"string_param": region},
        "shared_memory_byte_size": {"int64_param": byte_size},
    }
    request: dict[str, Any] = {
        "model_name": IMAGE,
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 8, 8], "parameters": params}],
    }
    if output_region:
        out_params = {
            "shared_memory_region": {"string_param": output_region},
            "shared_memory_byte_size": {"int64_param": 12},
        }
        request["outputs"] = [{"name": "logits", "parameters": out_params}]
    return request


def inference_count(triton: Triton, model: str) -> int:
    stats = triton.call("get_inference_statistics", model, as_json=True)["model_stats"]
    return sum(int(s.get("inference_count", 0)) for s in stats)


@pytest.mark.usefixtures("clean_status")
def test_infer_with_a_bad_region_is_invalid_and_the_server_keeps_serving(
    triton: Triton, shm_objects: MakeObject
) -> None:
    size = 3 * TINY_IMAGE_SIZE * TINY_IMAGE_SIZE * 4
    pixels = RNG.normal(size=(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype("<f4")
    key, memory = shm_objects(size + 64)
    memory[:size] = pixels.tobytes()
    name = unique("in")
    out = unique("out")
    never = unique("never")
    triton.call("register_system_shared_memory", name, key, size)
    triton.call("register_system_shared_memory", out, key, 64, offset=size)
    outputs = triton.raw_infer(shm_request(name, size, out))
    assert outputs["logits"][:2] == ("FP32", [1, 3]) and outputs["logits"][2] == b""
    plain = triton.infer(IMAGE, [("pixel_values", "FP32", pixels)], outputs=["logits"])
    written = np.frombuffer(bytes(memory[size : size + 12]), "<f4").reshape(1, 3)
    np.testing.assert_allclose(written, plain.outputs["logits"], rtol=0, atol=1e-6)
    cases = {
        f"'{never}' is not registered": shm_request(never, size),
        "shared_memory_byte_size is 64, but shape [1, 3, 8, 8] of FP32 needs 768": shm_request(name, 64),
        f"requested output 'logits': shared memory region '{never}' is not registered": shm_request(
            name, size, never
        ),
    }
    for message, request in cases.items():
        with pytest.raises(TritonError) as caught:
            triton.raw_infer(request)
        assert caught.value.code == "INVALID_ARGUMENT" and message in caught.value.message, caught.value
    triton.call("unregister_system_shared_memory", name)
    with pytest.raises(TritonError) as unregistered:
        triton.raw_infer(shm_request(name, size))
    assert unregistered.value.code == "INVALID_ARGUMENT"
    assert (
        f"input 'pixel_values': shared memory region '{name}' is not registered" in unregistered.value.message
    )
    # Output too small for what was set aside, through tritonclient's own API: refused before
    # the model runs, so the model's inference count stays where it was.
    ran_before = inference_count(triton, IMAGE)
    with pytest.raises(TritonError) as small:
        triton.shm_infer(IMAGE, [("pixel_values", "FP32", pixels, True)], [("logits", 8)], unique("small"))
    assert small.value.code == "INVALID_ARGUMENT"
    assert "the output has 12 bytes, more than shared_memory_byte_size 8" in small.value.message
    assert inference_count(triton, IMAGE) == ran_before
    # Still serving, and the regions shm_infer made are gone again.
    again = triton.infer(IMAGE, [("pixel_values", "FP32", pixels)], outputs=["logits"])
    np.testing.assert_array_equal(again.outputs["logits"], plain.outputs["logits"])
    assert set(regions(triton)) == {out}
