"""Execution providers by short name (cpu, cuda, tensorrt, openvino), which installed package
provides each, and install hints.

OpenVINO comes from either of two packages: the `onnxruntime-openvino` wheel, an ONNX Runtime
build that lists OpenVINOExecutionProvider among its providers (it installs the `onnxruntime`
module in place of the plain package), or the `onnxruntime-ep-openvino` plugin, registered
beside a plain onnxruntime (its device filter accepts Intel hardware only). The built-in one is
used whenever the installed ONNX Runtime offers it. CUDA and TensorRT come from the
`onnxruntime-gpu` build. Everything here asks `onnxruntime` (and, for the plugin, its module) at
call time, so tests can fake either.
"""

from __future__ import annotations

import importlib.metadata

import onnxruntime as ort

from gdws_onnx.errors import GDWSError

ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# ONNX Runtime distributions that provide the `onnxruntime` module, most specific first
ORT_DISTRIBUTIONS = ("onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-qnn",
                     "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime")
OPENVINO_BUILD = "onnxruntime-openvino"
OPENVINO_PLUGIN = "onnxruntime-ep-openvino"
SWAP = "pip uninstall -y onnxruntime && pip install {0}"  # the builds replace the plain package's module
INSTALL_HINTS = {
    "cuda": SWAP.format("onnxruntime-gpu") + " (needs an NVIDIA GPU with CUDA 12 drivers)",
    "tensorrt": SWAP.format("onnxruntime-gpu") + " and TensorRT (needs an NVIDIA GPU)",
    "openvino": (SWAP.format(OPENVINO_BUILD) + " (ONNX Runtime built with OpenVINO; any x86-64 CPU), or "
                 f"pip install {OPENVINO_PLUGIN} (a plugin EP beside onnxruntime; Intel devices only)"),
}


def parse_eps(spec: str) -> list[str]:
    """'cpu,cuda' -> ['cpu', 'cuda'], rejecting unknown names."""
    eps = [e.strip().lower() for e in spec.split(",") if e.strip()]
    unknown = [e for e in eps if e not in ORT_NAMES]
    if unknown or not eps:
        raise GDWSError(f"unknown execution provider(s) {unknown or spec!r}; choose from {', '.join(ORT_NAMES)}")
    return eps


def ort_distribution() -> str:
    """The installed distribution that provides the `onnxruntime` module ('onnxruntime',
    'onnxruntime-openvino', 'onnxruntime-gpu', ...; '' when none is recorded)."""
    for name in ORT_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return ""


def openvino_source() -> str:
    """Which package provides OpenVINO here: OPENVINO_BUILD when the installed ONNX Runtime
    lists OpenVINOExecutionProvider, else OPENVINO_PLUGIN when its module imports. Raises
    GDWSError naming both packages when neither is installed."""
    if ORT_NAMES["openvino"] in ort.get_available_providers():
        return OPENVINO_BUILD
    try:
        import onnxruntime_ep_openvino  # noqa: F401
    except ImportError:
        raise GDWSError(f"execution provider 'openvino' is not installed: {INSTALL_HINTS['openvino']}") from None
    return OPENVINO_PLUGIN


def provider_source(ep: str) -> str:
    """The package a short EP name is taken from here (for reports and latency tables)."""
    return openvino_source() if ep == "openvino" else ort_distribution()


def _register_openvino() -> list:
    import onnxruntime_ep_openvino as ov

    name = ov.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library(name, ov.get_library_path())
        except Exception as e:  # noqa: BLE001 - a second registration or a broken plugin
            if "already" not in str(e).lower():
                raise GDWSError(f"cannot register the OpenVINO plugin: {e}") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        vendor = _cpu_vendor()
        why = (f"; its device filter accepts Intel hardware only and this CPU is {vendor} "
               "(microsoft/onnxruntime PR 31981 lifts that for CPUs)" if vendor and vendor != "GenuineIntel" else "")
        raise GDWSError(f"the OpenVINO plugin is installed but reports no device on this machine{why}; "
                        f"{SWAP.format(OPENVINO_BUILD)} runs on any x86-64 CPU")
    return devices


def _cpu_vendor() -> str:
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...), '' when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def configure(so: ort.SessionOptions, ep: str) -> list | None:
    """Set up `so` for the EP; returns the `providers` argument for InferenceSession
    (None when the EP was attached to the options, as plugin EPs are). OpenVINO runs on its CPU
    device. Raises GDWSError with the install hint when the EP is not installed."""
    if ep == "cpu":
        return ["CPUExecutionProvider"]
    if ep == "openvino":
        options = openvino_options(so)
        if openvino_source() == OPENVINO_BUILD:
            return [(ORT_NAMES["openvino"], options), "CPUExecutionProvider"]
        so.add_provider_for_devices(_register_openvino()[:1], options)
        return None
    name = ORT_NAMES[ep]
    if name not in ort.get_available_providers():
        raise GDWSError(f"execution provider '{ep}' is not available in this onnxruntime "
                        f"({', '.join(ort.get_available_providers())}): {INSTALL_HINTS[ep]}")
    return [name, "CPUExecutionProvider"]


def openvino_options(so: ort.SessionOptions) -> dict[str, str]:
    """OpenVINO's provider options: its CPU device, and the session's intra-op thread count
    (OpenVINO keeps its own thread pool, all cores by default, and ignores ORT's setting)."""
    threads = getattr(so, "intra_op_num_threads", 0)
    return {"device_type": "CPU", **({"num_of_threads": str(threads)} if threads else {})}


def require_active(session_providers: list[str], ep: str) -> None:
    """Raise GDWSError if a session meant for `ep` does not run on it: ONNX Runtime falls back to
    the CPU EP silently when a listed EP's libraries (CUDA, cuDNN, TensorRT) fail to load, and
    numbers measured that way would be the CPU's."""
    if ep != "cpu" and ORT_NAMES[ep] not in session_providers:
        raise GDWSError(f"the {ep} session fell back to {', '.join(session_providers) or 'nothing'}: "
                        f"ONNX Runtime lists {ORT_NAMES[ep]} but could not load it here "
                        f"(libraries or device missing; {INSTALL_HINTS[ep]})")
