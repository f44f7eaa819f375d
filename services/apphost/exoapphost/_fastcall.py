"""Lean crossings between Python and wasm for the app host's hot paths.

wasmtime-py's `Func.__call__` rebuilds the function's type and converts every value on each call,
and its host-function trampoline does the same and builds a `Caller`: tens of microseconds per
crossing, and a message to an app crosses two or three times. The ABI only passes i32 arguments
and returns one i32 or i64, so these helpers use the C API directly:

* `GuestFunc(store, func)`: calls an export with preallocated argument and result arrays; traps and
  errors surface exactly as with `Func.__call__` (`wasmtime.Trap`, `WasmtimeError`, `ExitTrap`).
* `host_func(store, params, result, callback)`: a `Func` whose trampoline passes the i32 arguments
  to `callback` and writes its result. The callback must not raise (the app host's host functions
  record a fault instead); if one does anyway, the guest traps with "host function failed".

They reach into wasmtime-py internals (`wasmtime._ffi`), which is why wasmtime is pinned in
pyproject.toml; `AVAILABLE` is False (and the runtime uses the public API) if those internals are
not what this module expects.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import sys
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_void_p, cast
from typing import Any

from wasmtime import Func, FuncType, Store, Trap, ValType, WasmtimeError

log = logging.getLogger(__name__)

try:
    from wasmtime import _ffi as ffi
    from wasmtime._func import maybe_raise_last_exn

    _I32 = ffi.WASMTIME_I32.value
    _I64 = ffi.WASMTIME_I64.value
    _TRAP_POINTER = POINTER(ffi.wasm_trap_t)
    _CALLBACK = ffi.wasmtime_func_callback_t
    _FINALIZER = ctypes.CFUNCTYPE(None, c_void_p)
    AVAILABLE = all(hasattr(ffi, name) for name in ("wasmtime_func_call", "wasmtime_func_new", "wasmtime_val_t"))
except (ImportError, AttributeError):  # pragma: no cover - another wasmtime-py layout
    AVAILABLE = False


def _kind_of(valtype: ValType) -> int:
    if valtype == ValType.i32():
        return _I32
    if valtype == ValType.i64():
        return _I64
    raise TypeError(f"only i32 and i64 values are supported, got {valtype}")


class GuestFunc:
    """An export of an instance, called with i32 arguments (see module docstring)."""

    def __init__(self, store: Store, func: Func) -> None:
        ty = func.type(store)
        params = list(ty.params)
        results = list(ty.results)
        if len(results) > 1:
            raise TypeError("at most one result is supported")
        self._nparams = len(params)
        self._nresults = len(results)
        self._params = (ffi.wasmtime_val_t * max(1, self._nparams))()
        for i, p in enumerate(params):
            if _kind_of(p) != _I32:
                raise TypeError("only i32 parameters are supported")
            self._params[i].kind = _I32
        self._results = (ffi.wasmtime_val_t * max(1, self._nresults))()
        self._result_kind = _kind_of(results[0]) if results else None
        self._func = func  # keeps the wasmtime_func_t alive
        self._func_ref = byref(func._func)
        self._context = store._context()

    def __call__(self, *args: int) -> int | None:
        params = self._params
        for i, value in enumerate(args):
            params[i].of.i32 = value
        trap = _TRAP_POINTER()
        error = ffi.wasmtime_func_call(
            self._context, self._func_ref, params, self._nparams, self._results, self._nresults, byref(trap)
        )
        if error:
            maybe_raise_last_exn()
            raise WasmtimeError._from_ptr(error)
        if trap:
            trap_obj = Trap._from_ptr(trap)
            maybe_raise_last_exn()
            raise trap_obj
        if self._result_kind is None:
            return None
        result = self._results[0]
        return int(result.of.i32 if self._result_kind == _I32 else result.of.i64)


# Host callbacks by id: the C side keeps the id, the finalizer removes it with the store.
_CALLBACKS: dict[int, tuple[Callable[..., Any], int | None]] = {}
_ids = itertools.count(1)  # next() is atomic under the GIL: runner threads create functions concurrently


@_CALLBACK  # type: ignore[misc]
def _trampoline(env, caller, params, nparams, results, nresults):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    try:
        callback, result_kind = _CALLBACKS[env or 0]
        value = callback(*[params[i].of.i32 for i in range(nparams)])
        if result_kind is not None:
            results[0].kind = result_kind
            if result_kind == _I32:
                results[0].of.i32 = value
            else:
                results[0].of.i64 = value
        return 0
    except BaseException:  # a bug: never let a Python exception unwind through wasm
        log.exception("host function failed")
        trap = Trap("host function failed")._consume()
        return cast(trap, c_void_p).value


@_FINALIZER  # type: ignore[misc]
def _finalize(env, _is_finalizing=sys.is_finalizing):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    # Finalizers also run at interpreter exit; freeing callbacks then crashes the process, and the
    # process is going away anyway.
    if _is_finalizing():
        return
    _CALLBACKS.pop(env or 0, None)


def host_func(store: Store, params: Sequence[ValType], result: ValType | None, callback: Callable[..., Any]) -> Func:
    """A host function of `store` calling `callback(*i32_args)` (see module docstring)."""
    for p in params:
        if _kind_of(p) != _I32:
            raise TypeError("only i32 parameters are supported")
    ty = FuncType(list(params), [result] if result is not None else [])
    callback_id = next(_ids)
    _CALLBACKS[callback_id] = (callback, _kind_of(result) if result is not None else None)
    raw = ffi.wasmtime_func_t()
    ffi.wasmtime_func_new(store._context(), ty.ptr(), _trampoline, callback_id, _finalize, byref(raw))
    return Func._from_raw(raw)
