"""The direct kernel launcher (``hrkernels/ops/_launch.Launcher``).

On CPU the launcher runs against a stand-in for a ``@triton.jit`` function and its compiled kernel,
so that its caching and the arguments it passes are checked exactly; on the GPU against real
kernels, bit for bit against Triton's own launch.
"""

from __future__ import annotations

import pytest
import torch
import triton.language as tl

from hrkernels.ops import _launch
from hrkernels.ops._launch import Launcher


def _kernel(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, EVEN: tl.constexpr = False):
    pass


class FakeCompiled:
    """Stands in for a ``CompiledKernel``: records what its C launcher is called with."""

    function = "function handle"
    packed_metadata = "packed metadata"

    def __init__(self):
        self.runs: list[tuple] = []

    def run(self, *args):
        self.runs.append(args)


class FakeJit:
    """Stands in for a ``@triton.jit`` function: ``fn[grid](...)`` compiles once per call."""

    __name__ = "_kernel"
    fn = staticmethod(_kernel)

    def __init__(self):
        self.calls: list[tuple] = []
        self.compiled: list[FakeCompiled] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return launch


@pytest.fixture
def direct(monkeypatch):
    """A launcher on the direct path, with the current device and stream of a fake CUDA."""
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234,
                        raising=False)
    monkeypatch.setattr(_launch, "_hooks_installed", lambda: False)
    fn = FakeJit()
    launcher = Launcher(fn)
    launcher.direct = True
    return fn, launcher


def _args(x, n=64, scale=0.5):
    return x, torch.empty_like(x), n, scale


def test_a_repeated_launch_calls_the_compiled_kernel_with_tritons_arguments(direct):
    fn, launcher = direct
    x = torch.zeros(64)
    launcher[(3,)](*_args(x), BLOCK=32, num_warps=2)
    assert len(fn.calls) == 1 and fn.calls[0][0] == (3,)
    args = _args(x, scale=0.25)
    launcher[(3,)](*args, BLOCK=32, num_warps=2)
    assert len(fn.calls) == 1  # no second compile or Python launch
    (run,) = fn.compiled[0].runs
    # grid padded to 3-D, the current stream, no launch metadata or hooks, then every argument in
    # signature order: the runtime ones as given, the constexprs with their defaults filled in.
    assert run[:9] == (3, 1, 1, 1234, "function handle", "packed metadata", None, None, None)
    assert run[9:11] == args[:2] and run[11:] == (64, 0.25, 32, False)


def test_before_triton_3_3_only_runtime_arguments_are_passed(direct, monkeypatch):
    fn, launcher = direct
    monkeypatch.setattr(_launch, "_triton_version", lambda: (3, 2))
    x = torch.zeros(64)
    for _ in range(2):
        launcher[(1, 2)](*_args(x), BLOCK=32)
    (run,) = fn.compiled[0].runs
    assert run[:3] == (1, 2, 1) and run[11:] == (64, 0.5)


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "constexpr", "option", "device"])
def test_anything_triton_specialises_on_compiles_again(direct, monkeypatch, change):
    fn, launcher = direct
    x = torch.zeros(64)
    launcher[(1,)](*_args(x), BLOCK=32, num_warps=4)
    args, kwargs = list(_args(x)), {"BLOCK": 32, "num_warps": 4}
    if change == "int":
        args[2] = 65
    elif change == "dtype":
        args[0] = x.half()
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1)
    launcher[(1,)](*args, **kwargs)
    assert len(fn.calls) == 2 and not fn.compiled[0].runs


def test_floats_and_other_tensors_of_the_same_kind_reuse_the_kernel(direct):
    fn, launcher = direct
    launcher[(1,)](*_args(torch.zeros(64)), BLOCK=32)
    launcher[(1,)](*_args(torch.ones(64), scale=3.0), BLOCK=32)
    assert len(fn.calls) == 1 and len(fn.compiled[0].runs) == 1


def test_bools_and_ints_are_different_keys(direct):
    fn, launcher = direct
    x = torch.zeros(64)
    launcher[(1,)](x, x, 1, 0.5, BLOCK=32)
    launcher[(1,)](x, x, True, 0.5, BLOCK=32)
    assert len(fn.calls) == 2


def test_launch_hooks_send_every_launch_through_triton(direct, monkeypatch):
    fn, launcher = direct
    x = torch.zeros(64)
    launcher[(1,)](*_args(x), BLOCK=32)
    monkeypatch.setattr(_launch, "_hooks_installed", lambda: True)
    launcher[(1,)](*_args(x), BLOCK=32)
    assert len(fn.calls) == 2 and not fn.compiled[0].runs


def test_the_cache_starts_over_when_full(direct, monkeypatch):
    fn, launcher = direct
    monkeypatch.setattr(_launch, "MAX_KERNELS", 2)
    x = torch.zeros(64)
    for n in (1, 2, 3):
        launcher[(1,)](*_args(x, n=n), BLOCK=32)
    assert len(launcher.kernels) == 1


@pytest.mark.parametrize("direct_path", [True, False])
@pytest.mark.parametrize(
    "call, message",
    [(lambda f, x: f(x, x, 64, 0.5, 32), "runtime parameters positionally"),
     (lambda f, x: f(x, x, 64, scale=0.5, BLOCK=32), "runtime parameter 'scale'"),
     (lambda f, x: f(x, x, 64, 0.5, EVEN=True), "missing constexpr 'BLOCK'")],
)
def test_a_call_that_breaks_the_convention_raises(direct, direct_path, call, message):
    fn, launcher = direct
    launcher.direct = direct_path
    with pytest.raises(TypeError, match=message):
        call(launcher[(1,)], torch.zeros(64))
    assert not fn.calls


def test_under_the_interpreter_every_launch_goes_through_triton(direct):
    fn, launcher = direct
    launcher.direct = False
    x = torch.zeros(64)
    for _ in range(2):
        launcher[(2,)](*_args(x), BLOCK=32)
    assert len(fn.calls) == 2 and not fn.compiled[0].runs


def test_real_kernels_are_interpreted_on_cpu():
    from hrkernels.ops.views.kernels import _dilated_copy_kernel

    assert _launch.interpreter_enabled()
    assert not _launch.launcher(_dilated_copy_kernel).direct


# --------------------------------------------------------------------------------------------------
# GPU: real kernels
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_direct_launches_match_tritons_own_bit_for_bit():
    from hrkernels import ops
    from hrkernels.ops.stats.op import _launchers

    launchers = _launchers()
    for factor in ((4, 4), (1, 1)):  # one launch, then two
        x = torch.randn(1, 4, 512, 512, device="cuda", dtype=torch.float16)
        first = ops.match_stats(x, 0.1, 0.9, factor)  # compiles (or finds) through fn[grid]
        assert any(launcher.kernels for launcher in launchers)
        for launcher in launchers:
            launcher.kernels.clear()
        through_triton = ops.match_stats(x, 0.1, 0.9, factor)
        direct = ops.match_stats(x, 0.1, 0.9, factor)
        torch.cuda.synchronize()
        assert torch.equal(first, through_triton) and torch.equal(direct, through_triton)


@pytest.mark.gpu
def test_direct_launches_follow_alignment_and_dtype():
    from hrkernels import ops
    from hrkernels.ops.views import reference

    base = torch.randn(2 * 4 * 64 * 64 + 8, device="cuda")
    for offset in (0, 1, 0, 3):  # aligned, then 4 and 12 bytes past a 16-byte boundary
        for dtype in (torch.float32, torch.float16):
            x = base.to(dtype)[offset:offset + 2 * 4 * 64 * 64].view(2, 4, 64, 64)
            for _ in range(2):
                expected = reference.gather_dilated(x, (2, 2), torch.contiguous_format)
                assert torch.equal(ops.gather_dilated(x, 2), expected)
