"""Execution providers by short name (cpu, cuda, tensorrt, openvino), with install hints."""

from __future__ import annotations

import onnxruntime as ort

from gdws_onnx.errors import GDWSError

ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
INSTALL_HINTS = {
    "cuda": "pip install onnxruntime-gpu (needs an NVIDIA GPU with CUDA 12 drivers)",
    "tensorrt": "pip install onnxruntime-gpu and TensorRT (needs an NVIDIA GPU)",
    "openvino": "pip install onnxruntime-ep-openvino (a plugin EP beside onnxruntime)",
}


def parse_eps(spec: str) -> list[str]:
    """'cpu,cuda' -> ['cpu', 'cuda'], rejecting unknown names."""
    eps = [e.strip().lower() for e in spec.split(",") if e.strip()]
    unknown = [e for e in eps if e not in ORT_NAMES]
    if unknown or not eps:
        raise GDWSError(f"unknown execution provider(s) {unknown or spec!r}; choose from {', '.join(ORT_NAMES)}")
    return eps


def _register_openvino() -> list:
    try:
        import onnxruntime_ep_openvino as ov
    except ImportError:
        raise GDWSError(f"execution provider 'openvino' is not installed: {INSTALL_HINTS['openvino']}") from None
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
        raise GDWSError(f"the OpenVINO plugin is installed but reports no device on this machine{why}")
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
    (None when the EP was attached to the options, as plugin EPs are)."""
    if ep == "cpu":
        return ["CPUExecutionProvider"]
    if ep == "openvino":
        so.add_provider_for_devices(_register_openvino()[:1], {"device_type": "CPU"})
        return None
    name = ORT_NAMES[ep]
    if name not in ort.get_available_providers():
        raise GDWSError(f"execution provider '{ep}' is not available in this onnxruntime "
                        f"({', '.join(ort.get_available_providers())}): {INSTALL_HINTS[ep]}")
    return [name, "CPUExecutionProvider"]
