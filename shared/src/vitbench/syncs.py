"""Count the host syncs of a forward: the ops that make the host wait for the device stream.

On CUDA these ops block the Python thread until every queued kernel has finished (a read of a device value, or an
output whose *shape* depends on device data), so the GPU idles while Python catches up. :class:`SyncCounter` is a
``TorchDispatchMode`` that records them on any device, so a CPU test can bound what a CUDA run will pay:

* reads of device values: ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``equal``, ``is_nonzero``,
  ``Tensor.tolist()`` (no aten op on CPU, so the counter wraps it while active);
* data-dependent output shapes: ``nonzero``, ``masked_select``, the ``unique`` family, boolean-mask indexing and
  boolean-mask assignment, ``repeat_interleave`` without ``output_size``, ``bincount``;
* copies from an accelerator to the host.

Count under ``torch.no_grad()`` (as :func:`count_syncs` does): on CPU ``inference_mode`` reads scalars without
dispatching, so the counter would miss them. Usage::

    with SyncCounter() as syncs:
        model(x)
    syncs.total, syncs.by_op   # e.g. 9, {"tolist": 9}
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_SHAPE_FROM_DATA = {
    aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
    aten.bincount.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_COPIES = {aten._to_copy.default, aten.copy_.default}


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_sync(func, args: tuple, kwargs: dict) -> bool:
    if func in _READS or func in _SHAPE_FROM_DATA:
        return True
    if func in _INDEXING:
        return _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if func in _REPEAT:
        return kwargs.get("output_size") is None  # keyword-only in both overloads
    if func in _COPIES:
        src = args[1] if func is aten.copy_.default else args[0]
        dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device")
        return (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
                and dst_device is not None and torch.device(dst_device).type == "cpu")
    return False


class SyncCounter(TorchDispatchMode):
    """Dispatch mode counting host-sync ops (see the module docstring); ``by_op`` maps op name to count."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        original = torch.Tensor.tolist
        counter = self

        def tolist(t: torch.Tensor):
            counter.by_op["tolist"] += 1
            return original(t)

        torch.Tensor.tolist = tolist
        self._stack.callback(setattr, torch.Tensor, "tolist", original)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()


def count_syncs(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> dict[str, int]:
    """Host syncs of one inference call ``fn(inputs)``: ``{"total": n, op: count, ...}``.

    Runs under ``no_grad``, not ``inference_mode``: on CPU, ``inference_mode`` reads scalars (``.item()``, ``int(t)``)
    without dispatching ``_local_scalar_dense``, which would hide them from the counter. ``torch.compile``d parts run
    their Python code eagerly here (``set_stance("force_eager")``; dynamo cannot trace under a dispatch mode): the
    count is the program's, which the compiled graphs do not change."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), SyncCounter() as counter:
        fn(inputs)
    return {"total": counter.total, **dict(sorted(counter.by_op.items()))}
