"""Backend dispatch: HRKERNELS_BACKEND, use_backend and the errors for backends that cannot run."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from hrkernels.ops import (
    BackendUnavailableError,
    _backend,
    dilated_conv2d,
    frequency_fusion,
    gather_dilated,
    gaussian_blur2d,
    match_stats,
    select_backend,
    use_backend,
)
from hrkernels.ops.stats import op as stats_op


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


# --------------------------------------------------------------------------------------------------
# Implementation tables: one entry per backend, applicability predicates, the shared fake
# --------------------------------------------------------------------------------------------------


def _registered(module: str, name: str) -> _backend.RegisteredOp:
    return getattr(importlib.import_module(f"hrkernels.ops.{module}.op"), name)


TABLE_OPS = {  # op: (module, registered operator)
    "gather_windows": ("views", "_gather_windows_op"),
    "scatter_windows_mean": ("views", "_scatter_windows_mean_op"),
    "gather_dilated": ("views", "_gather_dilated_op"),
    "scatter_dilated": ("views", "_scatter_dilated_op"),
    "gaussian_blur2d": ("blur", "_gaussian_blur2d_op"),
    "frequency_fusion": ("blur", "_frequency_fusion_op"),
    "match_stats": ("stats", "_match_stats_op"),
    "dilated_conv2d": ("conv", "_dilated_conv2d_op"),
}


@pytest.mark.parametrize("op", TABLE_OPS)
def test_every_op_declares_a_reference_and_a_triton_implementation(op):
    table = _registered(*TABLE_OPS[op]).table
    assert table.name == op
    assert table.backends == ("torch", "triton")
    assert table.implementations["torch"].applies is None  # the reference takes every call


def test_a_table_needs_a_reference_for_every_call_and_known_backends():
    entry = _backend.Implementation(lambda x: x.clone())
    with pytest.raises(ValueError, match="needs a 'torch' entry"):
        _backend.ImplementationTable("clone", {"triton": entry})
    with pytest.raises(ValueError, match="needs a 'torch' entry"):
        _backend.ImplementationTable("clone", {"torch": entry, "metal": entry})
    # A table without a Triton entry: forcing Triton says the op has none.
    reference_only = _backend.ImplementationTable("clone", {"torch": entry})
    with _backend.use_backend("triton"), pytest.raises(_backend.BackendUnavailableError,
                                                       match="no implementation"):
        reference_only(torch.zeros(2))
    limited = _backend.Implementation(lambda x: x.clone(), applies=lambda x: False)
    with pytest.raises(ValueError, match="every call"):
        _backend.ImplementationTable("clone", {"torch": limited, "triton": entry})


def spy_on(monkeypatch, table: _backend.ImplementationTable) -> list[str]:
    """Record which backend's entry each call of ``table`` runs (the entries still run)."""
    calls: list[str] = []
    for backend, entry in table.implementations.items():
        def recorded(*args, backend=backend, function=entry.function):
            calls.append(backend)
            return function(*args)

        monkeypatch.setitem(table.implementations, backend,
                            _backend.Implementation(recorded, entry.applies))
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_forced_backend_runs_its_entry(monkeypatch, backend):
    calls = spy_on(monkeypatch, _registered("views", "_gather_dilated_op").table)
    x = torch.randn(1, 2, 4, 4)
    with use_backend(backend):
        out = gather_dilated(x, 2)
    assert calls == [backend]
    assert torch.equal(out, x.view(1, 2, 2, 2, 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(4, 2, 2, 2))


def test_calls_through_the_operator_dispatch_through_the_table(monkeypatch):
    calls = spy_on(monkeypatch, _registered("stats", "_match_stats_op").table)
    x = torch.randn(1, 2, 4, 4)
    with use_backend("triton"), RecordOps():
        match_stats(x, 0.0, 1.0)
    assert calls == ["triton"]


@pytest.mark.parametrize(
    "module, name, call, expected",
    [
        # kernel sizes the Triton kernel is not compiled for
        ("blur", "_gaussian_blur2d_op", lambda x: gaussian_blur2d(x, 3.0, 17), "torch"),
        ("blur", "_gaussian_blur2d_op", lambda x: gaussian_blur2d(x, 1.0, 3), "triton"),
        ("blur", "_frequency_fusion_op", lambda x: frequency_fusion(x, x + 1, 3.0, 17), "torch"),
        # integer dilation: cuDNN/ATen on every backend
        ("conv", "_dilated_conv2d_op",
         lambda x: dilated_conv2d(x, torch.randn(2, 2, 3, 3), dilation=2), "torch"),
        ("conv", "_dilated_conv2d_op",
         lambda x: dilated_conv2d(x, torch.randn(2, 2, 3, 3), dilation=1.5), "triton"),
    ],
)
def test_an_applicability_predicate_that_says_no_runs_the_reference(monkeypatch, module, name,
                                                                    call, expected):
    calls = spy_on(monkeypatch, _registered(module, name).table)
    with use_backend("triton"):
        call(torch.randn(1, 2, 5, 4))
    assert calls == [expected]


def test_offsets_past_int32_run_the_reference(monkeypatch):
    table = _registered("stats", "_match_stats_op").table
    arguments = (torch.randn(1, 2, 4, 4), 0.0, None, 1.0, None, 1, 1, False)
    with use_backend("triton"):
        assert table.choose(*arguments) == "triton"
        monkeypatch.setattr(stats_op, "image_offsets_fit_int32", lambda *tensors: False)
        assert table.choose(*arguments) == "torch"


@pytest.mark.parametrize("op", TABLE_OPS)
def test_forcing_a_backend_without_an_entry_raises_naming_the_op(op):
    table = _registered(*TABLE_OPS[op]).table
    assert "cuda" not in table.backends
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match=f"ops.{op}: .*'cuda'"):
        table.choose(torch.randn(1, 1, 2, 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(
    "module, name, call",
    [
        ("stats", "_match_stats_op", lambda x: match_stats(x, 0.0, 1.0, (2, 2))),
        ("blur", "_gaussian_blur2d_op", lambda x: gaussian_blur2d(x, 1.0, 3)),
        ("blur", "_frequency_fusion_op", lambda x: frequency_fusion(x, x, 1.0, 3)),
    ],
)
def test_the_shared_fake_keeps_shape_dtype_and_layout(module, name, call, layout):
    from conftest import make_layout

    assert _registered(module, name).op._abstract_fn is _backend.fake_like_first_input
    x = make_layout(torch.randn(2, 3, 4, 6, dtype=torch.float16), layout)
    real = call(x)
    with FakeTensorMode() as mode:
        fake = call(mode.from_tensor(x))
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    assert fake.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_the_shared_fake_under_torch_compile():
    x = torch.randn(1, 4, 6, 8).contiguous(memory_format=torch.channels_last)

    def block(x):
        return match_stats(gaussian_blur2d(x, 1.0, 3), 0.0, 1.0)

    compiled = torch.compile(block, backend="eager", fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, block(x))
    assert out.is_contiguous(memory_format=torch.channels_last)
