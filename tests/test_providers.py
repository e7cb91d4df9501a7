"""Which package an execution provider comes from, and the errors when it is missing.

Everything is faked (what providers.py asks onnxruntime, the plugin module, package metadata):
no OpenVINO or GPU build is needed, and none is used even where one is installed."""

import importlib.metadata
import sys
import types

import onnxruntime as ort
import pytest

from gdws_onnx.cli import main
from gdws_onnx.errors import GDWSError
from gdws_onnx.runtime import bench, providers

OV = "OpenVINOExecutionProvider"


class FakeOptions:
    """SessionOptions that records the plugin devices attached to it."""

    def __init__(self):
        self.attached = []

    def add_provider_for_devices(self, devices, options):
        self.attached.append((list(devices), dict(options)))


def _available(monkeypatch, names):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))


def _plugin(monkeypatch, devices):
    """A fake onnxruntime_ep_openvino whose registration yields `devices`."""
    fake = types.SimpleNamespace(get_ep_name=lambda: OV, get_library_path=lambda: "libov.so")
    registered = []
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", fake)
    monkeypatch.setattr(ort, "register_execution_provider_library", lambda name, path: registered.append(path))
    monkeypatch.setattr(ort, "get_ep_devices", lambda: list(devices) if registered else [])
    return registered


def test_openvino_build_is_used_whenever_onnxruntime_offers_it(monkeypatch):
    _available(monkeypatch, [OV, "CPUExecutionProvider"])
    registered = _plugin(monkeypatch, [types.SimpleNamespace(ep_name=OV)])  # a plugin too: not used
    so = FakeOptions()
    assert providers.openvino_source() == providers.OPENVINO_BUILD
    assert providers.configure(so, "openvino") == [(OV, {"device_type": "CPU"}), "CPUExecutionProvider"]
    assert so.attached == [] and registered == []


def test_openvino_gets_the_session_thread_count(monkeypatch):
    _available(monkeypatch, [OV, "CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    assert providers.configure(so, "openvino")[0] == (OV, {"device_type": "CPU", "num_of_threads": "1"})


def test_openvino_plugin_is_used_beside_a_plain_onnxruntime(monkeypatch):
    _available(monkeypatch, ["CPUExecutionProvider"])
    device = types.SimpleNamespace(ep_name=OV)
    registered = _plugin(monkeypatch, [device])
    so = FakeOptions()
    assert providers.openvino_source() == providers.OPENVINO_PLUGIN
    assert providers.configure(so, "openvino") is None
    assert registered == ["libov.so"] and so.attached == [([device], {"device_type": "CPU"})]


def test_openvino_missing_names_both_packages_and_the_swap(monkeypatch):
    _available(monkeypatch, ["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # not installed
    with pytest.raises(GDWSError) as e:
        providers.configure(FakeOptions(), "openvino")
    msg = str(e.value)
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-openvino" in msg
    assert "pip install onnxruntime-ep-openvino" in msg


def test_openvino_plugin_without_a_device_points_at_the_build(monkeypatch):
    _available(monkeypatch, ["CPUExecutionProvider"])
    _plugin(monkeypatch, [])
    monkeypatch.setattr(providers, "_cpu_vendor", lambda: "AuthenticAMD")
    with pytest.raises(GDWSError, match="Intel hardware only and this CPU is AuthenticAMD.*onnxruntime-openvino"):
        providers.configure(FakeOptions(), "openvino")


@pytest.mark.parametrize("ep, name", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_gpu_eps_come_from_onnxruntime_gpu(monkeypatch, ep, name):
    _available(monkeypatch, ["CPUExecutionProvider"])
    with pytest.raises(GDWSError, match="pip uninstall -y onnxruntime && pip install onnxruntime-gpu"):
        providers.configure(FakeOptions(), ep)
    _available(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers.configure(FakeOptions(), ep) == [name, "CPUExecutionProvider"]


def test_a_session_that_fell_back_to_the_cpu_is_an_error(monkeypatch):
    """ORT lists CUDA but cannot load its libraries: it runs on the CPU EP without an error."""
    _available(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class FellBack:
        def __init__(self, src, so, providers=None):
            self.asked = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    with pytest.raises(GDWSError, match="cuda session fell back to CPUExecutionProvider.*onnxruntime-gpu"):
        bench.make_session("model.onnx", bench.BenchConfig(ep="cuda"))
    providers.require_active(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda")  # no error
    providers.require_active(["CPUExecutionProvider"], "cpu")


def test_bench_cli_missing_ep_exits_2_with_the_hint(monkeypatch, runner, cnn_path):
    _available(monkeypatch, ["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)
    for ep, hint in (("cuda", "onnxruntime-gpu"), ("tensorrt", "onnxruntime-gpu"),
                     ("openvino", "onnxruntime-openvino")):
        r = runner.invoke(main, ["bench", cnn_path, "--ep", ep, "--runs", "3"])
        assert r.exit_code == 2 and hint in r.output, (ep, r.output)


def test_ort_distribution_names_the_installed_build(monkeypatch):
    installed = {"onnxruntime-openvino": "1.24.1"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert providers.ort_distribution() == "onnxruntime-openvino"
    installed.clear()
    installed["onnxruntime"] = "1.32.0"
    assert providers.ort_distribution() == "onnxruntime"
    installed.clear()
    assert providers.ort_distribution() == ""
