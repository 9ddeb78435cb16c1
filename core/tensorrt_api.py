"""The real TensorRT toolkit: engine build with the ``tensorrt`` Python API, and execution
with device buffers managed through the CUDA driver API (``libcuda`` via ctypes).

Torch-free and free of pycuda/cupy: the driver library ships with every NVIDIA driver, so
the only extra package an edge device needs is ``tensorrt``. Everything here is imported
only when the ``tensorrt`` backend is chosen (``ngcal.core.trt_backend.load_toolkit``).

Build (TensorRT >= 8.6; explicit batch; one optimisation profile 1..max_batch with the
optimum at batch 1 for single-image latency), FP16 by builder flag, a workspace pool
limit, and a timing cache that is loaded before and saved after each build so rebuilds
on the same GPU skip kernel autotuning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError
from .files import atomic_write_bytes
from .ort_backend import INPUT_NAME

log = logging.getLogger(__name__)


class CudaDriver:
    """Minimal CUDA driver API: device name, primary context, stream, memory, copies."""

    def __init__(self, device: int = 0) -> None:
        name = ctypes.util.find_library("cuda") or "libcuda.so.1"
        try:
            self._lib = ctypes.CDLL(name)
        except OSError as e:
            raise BackendError(
                f"no NVIDIA driver: cannot load {name} ({e}); the tensorrt backend needs a GPU"
            ) from e
        self._check(self._lib.cuInit(0), "cuInit")
        count = ctypes.c_int(0)
        self._check(self._lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value <= device:
            raise BackendError(f"CUDA device {device} absent ({count.value} device(s) found)")
        self._dev = ctypes.c_int(0)
        self._check(self._lib.cuDeviceGet(ctypes.byref(self._dev), device), "cuDeviceGet")
        buf = ctypes.create_string_buffer(256)
        self._check(self._lib.cuDeviceGetName(buf, 256, self._dev), "cuDeviceGetName")
        self.name = buf.value.decode(errors="replace")
        self._ctx = ctypes.c_void_p()
        self._check(
            self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), self._dev),
            "cuDevicePrimaryCtxRetain",
        )
        self.make_current()
        self.stream = ctypes.c_void_p()
        self._check(self._lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self._lib.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else f"error {rc}"
            raise BackendError(f"CUDA {what} failed: {text}")

    def make_current(self) -> None:
        """Bind the primary context to the calling thread (contexts are per thread)."""
        self._check(self._lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def malloc(self, nbytes: int) -> int:
        """Device allocation; returns the device pointer."""
        ptr = ctypes.c_uint64(0)
        self._check(
            self._lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc"
        )
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        """Release a device allocation."""
        self._check(self._lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def htod(self, dst: int, src: np.ndarray) -> None:
        """Copy a C-contiguous host array to device memory on the stream."""
        self._check(
            self._lib.cuMemcpyHtoDAsync_v2(
                ctypes.c_uint64(dst),
                ctypes.c_void_p(src.ctypes.data),
                ctypes.c_size_t(src.nbytes),
                self.stream,
            ),
            "cuMemcpyHtoDAsync",
        )

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        """Copy device memory into a C-contiguous host array on the stream."""
        self._check(
            self._lib.cuMemcpyDtoHAsync_v2(
                ctypes.c_void_p(dst.ctypes.data),
                ctypes.c_uint64(src),
                ctypes.c_size_t(dst.nbytes),
                self.stream,
            ),
            "cuMemcpyDtoHAsync",
        )

    def sync(self) -> None:
        """Wait for the stream."""
        self._check(self._lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def close(self) -> None:
        """Destroy the stream and release the primary context."""
        if self.stream:
            self._lib.cuStreamDestroy_v2(self.stream)
            self.stream = ctypes.c_void_p()
        if self._ctx:
            self._lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            self._ctx = ctypes.c_void_p()


class RealEngineRunner:
    """An engine, its execution context and device buffers sized for ``max_batch``."""

    def __init__(self, trt: Any, cuda: CudaDriver, engine: Any, max_batch: int) -> None:
        self._trt, self._cuda, self._engine = trt, cuda, engine
        self.keep_alive: Any = None
        self._ctx = engine.create_execution_context()
        if self._ctx is None:
            raise BackendError("TensorRT could not create an execution context (out of memory?)")
        self._names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._buffers: dict[str, int] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        for name in self._names:
            shape = (
                list(engine.get_tensor_profile_shape(name, 0)[2]) if name == INPUT_NAME else None
            )
            if shape is None:
                shape = [max_batch if d < 0 else d for d in engine.get_tensor_shape(name)]
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._dtypes[name] = dtype
            self._buffers[name] = cuda.malloc(int(np.prod(shape)) * dtype.itemsize)
            self._ctx.set_tensor_address(name, self._buffers[name])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Copy in, execute, copy out; outputs take their shapes from the context."""
        self._cuda.make_current()
        x = np.ascontiguousarray(batch, dtype=self._dtypes[INPUT_NAME])
        if not self._ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise BackendError(f"TensorRT refused input shape {tuple(x.shape)}")
        self._cuda.htod(self._buffers[INPUT_NAME], x)
        if not self._ctx.execute_async_v3(self._cuda.stream.value or 0):
            raise BackendError("TensorRT execute_async_v3 failed")
        out: dict[str, np.ndarray] = {}
        for name in self._names:
            if name == INPUT_NAME:
                continue
            arr = np.empty(tuple(self._ctx.get_tensor_shape(name)), dtype=self._dtypes[name])
            self._cuda.dtoh(arr, self._buffers[name])
            out[name] = arr
        self._cuda.sync()
        return out

    def close(self) -> None:
        """Free device buffers, the context and the driver handles."""
        for ptr in self._buffers.values():
            self._cuda.free(ptr)
        self._buffers.clear()
        self._ctx = None
        self._engine = None
        self._cuda.close()


class RealToolkit:
    """``TrtToolkit`` over the installed ``tensorrt`` package and the first CUDA device."""

    def __init__(self, trt: Any, cuda: CudaDriver) -> None:
        self._trt = trt
        self._cuda = cuda
        self._logger = trt.Logger(trt.Logger.WARNING)

    @classmethod
    def create(cls) -> RealToolkit:
        """Import tensorrt and open the GPU; BackendError says which one is missing."""
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendError(
                "TensorRT is not installed (python package 'tensorrt'); install it on the "
                "GPU device, or use backend ort-cpu / ort-cuda"
            ) from e
        return cls(trt, CudaDriver())

    @property
    def tensorrt_version(self) -> str:
        """The TensorRT version engines are built with."""
        return str(self._trt.__version__)

    def gpu_name(self) -> str:
        """The CUDA device name, e.g. ``NVIDIA H200``."""
        return self._cuda.name

    def build_engine(
        self,
        onnx_path: Path,
        *,
        precision: str,
        image_size: int,
        max_batch: int,
        workspace_bytes: int,
        timing_cache: Path,
    ) -> bytes:
        """Parse ``onnx_path`` and build a serialized engine for this GPU."""
        trt = self._trt
        self._cuda.make_current()
        builder = trt.Builder(self._logger)
        major = int(str(trt.__version__).split(".")[0])
        flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"{onnx_path}: TensorRT cannot parse the ONNX: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if precision == "fp16":
            if not getattr(builder, "platform_has_fast_fp16", True):
                log.warning("%s has no fast FP16; building FP16 anyway", self._cuda.name)
            config.set_flag(trt.BuilderFlag.FP16)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, False):
            log.warning(
                "%s: timing cache rejected (other GPU or TensorRT?); starting empty", timing_cache
            )
            config.set_timing_cache(config.create_timing_cache(b""), False)
        s = image_size
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, (1, 3, s, s), (1, 3, s, s), (max_batch, 3, s, s))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(
                f"{onnx_path}: TensorRT engine build failed ({precision}, workspace "
                f"{workspace_bytes >> 20} MiB); see the TensorRT log above"
            )
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(serialized))

    def load_engine(self, data: bytes, *, max_batch: int) -> RealEngineRunner:
        """Deserialize ``data`` on this GPU and allocate buffers for ``max_batch``."""
        self._cuda.make_current()
        runtime = self._trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(
                "TensorRT could not deserialize the engine (built by another TensorRT or GPU?)"
            )
        runner = RealEngineRunner(self._trt, self._cuda, engine, max_batch)
        runner.keep_alive = runtime  # the runtime must outlive its engines
        return runner
