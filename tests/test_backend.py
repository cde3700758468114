"""Backend dispatch: HRKERNELS_BACKEND, use_backend and the errors for backends that cannot run."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from hrkernels.ops import (
    BackendUnavailableError,
    _backend,
    gather_dilated,
    select_backend,
    use_backend,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("HRKERNELS_BACKEND", raising=False)


def test_auto_runs_the_reference_on_cpu():
    assert select_backend("gather_dilated", torch.device("cpu")) == "torch"


def test_auto_runs_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: None)
    assert select_backend("gather_dilated", torch.device("cuda")) == "triton"


def test_environment_variable_forces_a_backend(monkeypatch, device):
    monkeypatch.setenv("HRKERNELS_BACKEND", "triton")
    assert select_backend("gather_dilated", device) == "triton"  # CUDA, or the interpreter on CPU
    monkeypatch.setenv("HRKERNELS_BACKEND", "torch")
    assert select_backend("gather_dilated", torch.device("cuda")) == "torch"


def test_use_backend_wins_over_the_environment(monkeypatch, device):
    monkeypatch.setenv("HRKERNELS_BACKEND", "torch")
    with use_backend("triton"):
        assert select_backend("gather_dilated", device) == "triton"
    assert select_backend("gather_dilated", device) == "torch"


def test_unknown_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv("HRKERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="HRKERNELS_BACKEND must be one of"):
        select_backend("gather_dilated", torch.device("cpu"))
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("fast"):
            pass


def test_forced_triton_without_interpreter_or_gpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        gather_dilated(torch.randn(1, 1, 4, 4), 2)


def test_forced_triton_on_other_devices_raises(monkeypatch):
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="mps"):
        select_backend("gather_dilated", torch.device("mps"))


def test_forced_cuda_extension_raises():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="not built"):
        gather_dilated(torch.randn(1, 1, 4, 4), 2)


def test_missing_triton_on_cuda_warns_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: "triton is not installed")
    _backend._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        assert select_backend("gather_dilated", torch.device("cuda")) == "torch"
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="not installed"):
        select_backend("gather_dilated", torch.device("cuda"))


def test_backend_report_names_every_backend():
    report = _backend.backend_report()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["cuda"].startswith("no:")


# --------------------------------------------------------------------------------------------------
# Registered operators: plain eager calls skip the dispatcher, everything else sees the operator
# --------------------------------------------------------------------------------------------------


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    calls = []
    registered = gather_dilated.__globals__["_gather_dilated_op"]
    assert isinstance(registered, _backend.RegisteredOp)
    monkeypatch.setattr(registered, "op", lambda *args: calls.append(args))
    x = torch.randn(1, 2, 4, 4)
    expected = x.view(1, 2, 2, 2, 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(4, 2, 2, 2)
    assert torch.equal(gather_dilated(x, (2, 2)), expected)
    assert calls == []


def test_dispatch_modes_and_fake_tensors_see_the_registered_operator():
    x = torch.randn(1, 2, 4, 4)
    with RecordOps() as recorder:
        out = gather_dilated(x, (2, 2))
    assert "hrkernels.gather_dilated.default" in recorder.ops
    assert torch.equal(out, gather_dilated(x, (2, 2)))
    with FakeTensorMode():
        fake = gather_dilated(torch.empty(2, 3, 8, 6), (2, 3))
    assert fake.shape == (12, 3, 4, 2)


def test_calls_that_record_autograd_go_through_the_operator():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert not _backend._plain_eager((x,))
    with torch.no_grad():
        assert _backend._plain_eager((x,))
    assert _backend._plain_eager((x.detach(), 1.0, None))
