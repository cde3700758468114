"""Backend dispatch: which implementation of an op runs for a given device.

Every op declares its implementations in a table, by backend name (:func:`dispatched_op`)::

    _match_stats_op = dispatched_op(
        "match_stats",
        {"torch": Implementation(_match_stats_reference),
         "triton": Implementation(_match_stats_triton, applies=_offsets_fit_int32)},
        fake=fake_like_first_input,
    )

``"torch"`` is the PyTorch reference, ``"triton"`` the Triton path (a ``"cuda"`` entry comes with
the CUDA C++ extension). The dispatch (:class:`ImplementationTable`) runs inside the registered
``hrkernels::<op>`` operator (so it is opaque to ``torch.compile``) and decides once per call:
:func:`select_backend` picks the backend from the device of the op's first argument (its input
tensor) and the requested backend, then that backend's entry runs, unless its ``applies``
predicate says the entry does not cover these arguments (a kernel size the Triton kernel is not
compiled for, offsets past int32, integer dilation): then the ``"torch"`` entry runs. The rules of
:func:`select_backend`:

* ``HRKERNELS_BACKEND`` (environment) or :func:`use_backend` (a context manager, which wins):
  ``auto`` (default), ``triton``, ``torch`` or ``cuda``.
* ``auto``: CUDA tensors run the Triton kernels; CPU, MPS and any other device run the PyTorch
  reference (a real implementation, not a test toy). If the tensors are on CUDA but Triton cannot be
  imported, the reference runs and a warning says so once.
* ``triton``: always the Triton kernels. On CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported); otherwise
  :class:`BackendUnavailableError`.
* ``torch``: always the reference.
* ``cuda``: the optional CUDA C++ extension; it is not built in this release and no table has a
  ``"cuda"`` entry, so forcing it raises :class:`BackendUnavailableError` naming the op and the
  reason.

Ops whose output is shaped like their first argument share one fake implementation
(:func:`fake_like_first_input`); the others register their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from hrkernels.ops._checks import output_memory_format

BACKENDS = ("auto", "triton", "torch", "cuda")
ENV_VAR = "HRKERNELS_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hrkernels_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``HRKERNELS_BACKEND`` or :func:`use_backend`) but cannot run here."""


def check_backend(device: torch.device) -> str:
    """The backend the ops will run on ``device`` (``"triton"`` or ``"torch"``): checks
    ``HRKERNELS_BACKEND`` and a forced backend once, before any work (the ``hrkernels`` commands
    call it first).

    Raises:
        ValueError: ``HRKERNELS_BACKEND`` is not a backend name.
        BackendUnavailableError: the forced backend cannot run on ``device``.
    """
    return select_backend("", device)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend`'s if active, else ``HRKERNELS_BACKEND``, else
    ``auto``."""
    override = _override.get()
    if override is not None:
        return override
    return _parse_env(os.environ.get(ENV_VAR, "auto"))


@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> str:
    return _check_name(value.strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (takes precedence over ``HRKERNELS_BACKEND``).

    Example::

        with hrkernels.ops.use_backend("torch"):
            out = hrkernels.ops.gather_dilated(x, 2)   # PyTorch reference even on CUDA
    """
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_import_error() -> str | None:
    """Why Triton cannot be imported, or None when it can (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the installation
        return f"importing triton failed: {error}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    error = triton_import_error()
    if error is not None:
        return error
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return (
            "Triton kernels need a CUDA device; CPU tensors need Triton's interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported)"
        )
    return f"Triton kernels do not run on {device.type} tensors"


def cuda_unavailable_reason() -> str:
    """Why the CUDA C++ extension cannot run (it is not part of this release)."""
    return "the hrkernels CUDA C++ extension is not built in this release; every op runs on Triton"


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def select_backend(op: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for one call of ``op`` on ``device`` (``op`` names the op
    in messages; ``""``: any op).

    Raises:
        BackendUnavailableError: a forced backend cannot run on this device or installation.
    """
    requested = requested_backend()
    if requested == "auto" and device.type == "cuda" and triton_import_error() is None:
        return "triton"  # the common case, decided without the checks below
    if requested == "torch":
        return "torch"
    prefix = f"hrkernels.ops.{op}: " if op else ""
    if requested == "cuda":
        raise BackendUnavailableError(f"{prefix}backend 'cuda' requested, but "
                                      f"{cuda_unavailable_reason()}; use auto, triton or torch")
    reason = triton_unavailable_reason(device)
    if requested == "triton":
        if reason is not None:
            raise BackendUnavailableError(f"{prefix}backend 'triton' requested, but {reason}; "
                                          "use auto or torch")
        return "triton"
    if device.type == "cuda":
        if reason is None:
            return "triton"
        _warn_once(f"hrkernels: running the PyTorch reference ops on CUDA because {reason}")
    return "torch"


def backend_report() -> dict[str, str]:
    """For ``hrkernels info``: each backend and whether it is usable here (``"yes"`` or why not)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    triton_reason = triton_unavailable_reason(device)
    return {
        "torch": "yes (PyTorch reference; every device)",
        "triton": "yes" + (" (interpreter, CPU)" if device.type == "cpu" else "")
        if triton_reason is None
        else f"no: {triton_reason}",
        "cuda": f"no: {cuda_unavailable_reason()}",
    }


# --------------------------------------------------------------------------------------------------
# Implementation tables
# --------------------------------------------------------------------------------------------------

# The backends an implementation table may hold; "torch" (the reference) is required.
TABLE_BACKENDS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Implementation:
    """One backend's entry in an op's implementation table.

    Attributes:
        function: runs the op; takes the registered operator's arguments, in order, and returns a
            new tensor (never a view of an input).
        applies: for an implementation that covers only some calls, a predicate on the same
            arguments; where it returns False the ``"torch"`` entry (the reference) runs instead.
            None: every call.
    """

    function: Callable[..., torch.Tensor]
    applies: Callable[..., bool] | None = None


class ImplementationTable:
    """An op's implementations by backend name, and the dispatch between them.

    Calling the table with the operator's arguments runs the implementation :meth:`choose` picks.
    """

    def __init__(self, name: str, implementations: Mapping[str, Implementation]):
        if "torch" not in implementations or not set(implementations) <= set(TABLE_BACKENDS):
            raise ValueError(f"hrkernels.ops.{name}: an implementation table needs a 'torch' "
                             f"entry and only backends of {TABLE_BACKENDS}; got "
                             f"{tuple(implementations)}")
        if implementations["torch"].applies is not None:
            raise ValueError(f"hrkernels.ops.{name}: the reference ('torch') must apply to every "
                             "call")
        self.name = name
        self.implementations = dict(implementations)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends the table has an implementation for."""
        return tuple(self.implementations)

    @property
    def reference(self) -> Callable[..., torch.Tensor]:
        """The ``"torch"`` entry's function: the PyTorch reference, which takes every call."""
        return self.implementations["torch"].function

    def choose(self, *args: object) -> str:
        """The backend whose implementation runs a call with these arguments (the operator's).

        Raises:
            BackendUnavailableError: a forced backend cannot run here (see :func:`select_backend`).
        """
        backend = select_backend(self.name, args[0].device)
        if backend not in self.implementations:
            raise BackendUnavailableError(f"hrkernels.ops.{self.name}: backend {backend!r} has "
                                          "no implementation of this op")
        applies = self.implementations[backend].applies
        if applies is not None and not applies(*args):
            return "torch"
        return backend

    def __call__(self, *args: object) -> torch.Tensor:
        return self.implementations[self.choose(*args)].function(*args)


def fake_like_first_input(x: torch.Tensor, *args: object) -> torch.Tensor:
    """The fake implementation of every op whose output is shaped like its first argument: ``x``'s
    shape, dtype and device, in the layout the op writes (:func:`output_memory_format`)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


# --------------------------------------------------------------------------------------------------
# Registered operators with an eager fast path
# --------------------------------------------------------------------------------------------------


def _plain_eager(args: tuple) -> bool:
    """True when nothing but the implementation itself needs to see this call: no ``torch.compile``
    tracing, no dispatch or function mode (fake tensors, export, profilers of modes), only plain
    tensors (no subclass), and no autograd recording (the ops have no autograd formula: through the
    operator such a call is handled by PyTorch's autograd fallback)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()):
        return False
    recording = torch.is_grad_enabled()
    for arg in args:
        if type(arg) is torch.Tensor:
            if recording and arg.requires_grad:
                return False
        elif isinstance(arg, torch.Tensor):  # a subclass
            return False
    return True


def _no_context(ctx: object, inputs: tuple, output: object) -> None:
    """Nothing to save: the ops have no backward (:func:`_no_backward`)."""


def _no_backward(name: str, ctx: object, *grads: object) -> None:
    """The ops are inference-only. A forward under grad mode works (a patched UNet's weights
    require grad), so the error comes where a gradient is asked for, and says so."""
    raise RuntimeError(f"hrkernels.ops.{name} is inference-only: it has no backward, so no "
                       "gradient flows through it. Run it under torch.no_grad() or "
                       "torch.inference_mode() (hrkernels' samplers do); for gradients, use "
                       "the op's PyTorch reference (hrkernels/ops/<family>/reference.py)")


class RegisteredOp:
    """A ``torch.library.custom_op`` (``hrkernels::<name>``, no mutated arguments) whose plain eager
    calls skip the dispatcher.

    ``torch.compile``, fake tensors, export and dispatch modes see the registered operator
    (``self.op``, with the fake implementation ``fake`` or one given to :meth:`register_fake`), but
    a plain eager call runs the implementation directly: the dispatcher's Python layer costs tens of
    microseconds per call, more than the kernels of a latent-sized op (``bench/profile_ops.py``).

    ``implementation`` is an :class:`ImplementationTable` (the operator's schema then comes from
    the annotations of its ``"torch"`` entry) or, for an op that runs the same code on every
    backend, a function (schema from its own annotations).
    """

    def __init__(self, name: str, implementation: Callable[..., torch.Tensor],
                 fake: Callable[..., torch.Tensor] | None = None):
        self.implementation = implementation
        # The op's implementation table; None for an op with one implementation.
        self.table = implementation if isinstance(implementation, ImplementationTable) else None
        prototype = implementation if self.table is None else self.table.reference
        self.name = name
        self.op = torch.library.custom_op(
            f"hrkernels::{name}", implementation, mutates_args=(),
            schema=torch.library.infer_schema(prototype, mutates_args=()))
        if fake is not None:
            self.op.register_fake(fake)
        self.op.register_autograd(functools.partial(_no_backward, name),
                                  setup_context=_no_context)
        functools.update_wrapper(self, prototype, updated=())

    def __call__(self, *args):
        if _plain_eager(args):
            return self.implementation(*args)
        return self.op(*args)

    def register_fake(self, fake):
        return self.op.register_fake(fake)


def dispatched_op(name: str, implementations: Mapping[str, Implementation],
                  fake: Callable[..., torch.Tensor]) -> RegisteredOp:
    """Register ``hrkernels::<name>``, implemented by the table ``implementations`` (backend name
    -> :class:`Implementation`; ``"torch"`` required, ``"triton"``/``"cuda"`` optional) with the
    fake implementation ``fake``. The ``"torch"`` entry's annotations give the operator's schema:
    every entry takes the same arguments, the first of them the tensor whose device selects the
    backend."""
    return RegisteredOp(name, ImplementationTable(name, implementations), fake)


def registered_op(name: str):
    """Decorator: register ``hrkernels::<name>`` for an op that runs the same (device-generic
    PyTorch) code on every backend, and return its :class:`RegisteredOp`."""
    return lambda implementation: RegisteredOp(name, implementation)
