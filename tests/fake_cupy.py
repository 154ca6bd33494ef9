"""A stand-in for CuPy that runs on the CPU: GPU semantics without a GPU.

`autodiff.use_array_module(fake_cupy)` puts the project on this module. Its arrays (FakeArray)
hold a NumPy array as their "device memory" and follow the rules of cupy.ndarray that matter
for portable array code:

- no implicit conversion to NumPy: `np.asarray(a)` and `np.array(a)` raise TypeError, with
  CuPy's message;
- no mixing with host arrays: a numpy.ndarray (even 0-d) as an operand of an operator, a ufunc,
  an np.* or fake_cupy.* function, an index or an assigned value raises TypeError. Python and
  NumPy scalars as operands are fine and free, as on CuPy (they travel as kernel arguments);
- reductions and integer indexing give 0-d arrays, not NumPy scalars (CuPy never hands back a
  host scalar without being asked);
- transfers are explicit and counted in `transfers`: host->device ('h2d') by asarray/array of a
  host array, a list or a scalar (cupy.asarray(3.0) is a copy to the device, as is a Python
  number made into a 0-d array anywhere), a list index or value, `a.set(host)`; device->host ('d2h') by
  asnumpy(a), a.get(), a.item(), a.tolist(), and float/int/bool/complex of a 0-d array (each a
  device sync on a GPU). `events` says where each happened; `record()` collects the events of
  a block, so a test can assert that a training step makes none;
- `random.default_rng(seed)` gives a generator with exactly the sampling methods that
  cupy.random.Generator has that the project may use (no `permutation`, no `normal`).
  Legacy global sampling (`random.normal`, `random.seed`, ...) is left out on purpose: the
  project draws from autodiff.rng.

Anything else is forwarded to the NumPy function of the same name, with FakeArrays unwrapped
and results wrapped. What it does not model: which functions CuPy lacks, CuPy's dtype rules
where they differ from NumPy 2's, asynchronous execution, memory (only the errors of a full
device: `cuda.memory.OutOfMemoryError`, `cuda.runtime.CUDARuntimeError`), and performance.
Checked against the API of cupy 14 (cupy.ndarray's methods, cupy.random.Generator).
"""
import contextlib
import numbers
import sys
import traceback
import types

import numpy as np

# ---------------------------------------------------------------------------------------------
# Transfer counters
# ---------------------------------------------------------------------------------------------

transfers = {"h2d": 0, "d2h": 0}  # host->device and device->host copies (syncs included)
events = []  # (kind, what, where) for each, newest last


def reset():
    transfers.update(h2d=0, d2h=0)
    events.clear()


def _where(depth=3):
    """The innermost `depth` callers outside this file, innermost first: 'file:line in f <- ...'."""
    frames = [f for f in reversed(traceback.extract_stack()) if f.filename != __file__][:depth]
    return " <- ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in frames)


def _count(kind, what):
    transfers[kind] += 1
    events.append((kind, what, _where()))


@contextlib.contextmanager
def record():
    """`with record() as log: ...` — afterwards `log` lists the transfers made in the block."""
    start, log = len(events), []
    try:
        yield log
    finally:
        log.extend(events[start:])


# ---------------------------------------------------------------------------------------------
# Wrapping and unwrapping
# ---------------------------------------------------------------------------------------------

def _is_scalar(x):
    return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, np.ndarray)


def _host_array_error(what):
    return TypeError(f"{what}: a numpy.ndarray cannot be used with device arrays (CuPy refuses "
                     "it too); copy it to the device explicitly with xp.asarray")


def _dev(x, what):
    """The NumPy storage behind FakeArrays in x (also inside tuples, lists and dicts);
    a host array anywhere in x raises TypeError."""
    if isinstance(x, FakeArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _host_array_error(what)
    if isinstance(x, (tuple, list)):
        return type(x)(_dev(i, what) for i in x)
    if isinstance(x, dict):
        return {k: _dev(v, what) for k, v in x.items()}
    return x


def _wrap(x):
    """NumPy results become FakeArrays; NumPy scalars become 0-d FakeArrays, as on CuPy."""
    if isinstance(x, np.ndarray):
        return FakeArray(x)
    if isinstance(x, np.generic):
        return FakeArray(np.asarray(x))
    if isinstance(x, (tuple, list)):
        return type(x)(_wrap(i) for i in x)
    return x


def _apply(func, args, kwargs, what):
    """func on the unwrapped arguments; results wrapped, `out=` arrays returned as given."""
    result = func(*_dev(args, what), **_dev(kwargs, what))
    out = kwargs.get("out")
    if out is None:
        return _wrap(result)
    return out[0] if isinstance(out, tuple) and len(out) == 1 else out


def _index(index, what):
    """An index for the storage: FakeArrays unwrapped, host arrays refused, lists uploaded."""
    if isinstance(index, tuple):
        return tuple(_index(i, what) for i in index)
    if isinstance(index, list):
        _count("h2d", f"{what} with a list index")
        return np.asarray(_dev(index, what))
    return _dev(index, what)


def _ufunc_at(ufunc, a, index, *b, what):
    """ufunc.at(a, index, b) in place (the scatter-add of a backward pass)."""
    if not isinstance(a, FakeArray):
        raise _host_array_error(what)
    ufunc.at(a._a, _index(index, what), *_dev(b, what))


def _value(value, what):
    if isinstance(value, (list, tuple)):
        _count("h2d", f"{what} with a list value")
        return np.asarray(_dev(value, what))
    return _dev(value, what)


# ---------------------------------------------------------------------------------------------
# The array
# ---------------------------------------------------------------------------------------------

# The methods of cupy.ndarray (cupy 14) that have a NumPy method of the same meaning; `get`,
# `set`, `item` and `tolist` are defined below because they transfer.
_METHODS = frozenset("""all any argmax argmin argpartition argsort astype choose clip compress
    conj conjugate copy cumprod cumsum diagonal dot fill flatten max mean min nonzero partition
    prod put ravel repeat reshape round searchsorted sort squeeze std sum swapaxes take trace
    transpose var view""".split())


def _defers_to(other):
    """True where Python should try other's reflected operator (as cupy.ndarray does for a type
    with a higher __array_priority__, e.g. autodiff.Tensor)."""
    if isinstance(other, (FakeArray, np.ndarray)) or _is_scalar(other):
        return False
    return (getattr(other, "__array_ufunc__", 0) is None
            or getattr(other, "__array_priority__", -1e300) > FakeArray.__array_priority__)


def _binary(ufunc):
    def forward(self, other):
        return NotImplemented if _defers_to(other) else ufunc(self, other)

    def reflected(self, other):
        return NotImplemented if _defers_to(other) else ufunc(other, self)

    def inplace(self, other):
        return NotImplemented if _defers_to(other) else ufunc(self, other, out=(self,))
    return forward, reflected, inplace


class FakeArray:
    """A "device" array: a NumPy array that refuses to meet host arrays (see the module doc)."""
    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100  # cupy.ndarray's
    __hash__ = None

    def __init__(self, storage):
        assert isinstance(storage, np.ndarray), type(storage)
        self._a = storage

    # -- attributes ---------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: FakeArray(self._a.T))
    mT = property(lambda self: FakeArray(self._a.mT))
    real = property(lambda self: FakeArray(self._a.real))
    imag = property(lambda self: FakeArray(self._a.imag))

    def __getattr__(self, name):
        if name not in _METHODS:
            raise AttributeError(f"FakeArray has no attribute {name!r} (not on cupy.ndarray, or it "
                                 "exposes host memory)")
        method = getattr(self._a, name)
        return lambda *args, **kwargs: _apply(method, args, kwargs, f"ndarray.{name}")

    def __repr__(self):
        return f"FakeArray({self._a!r})"

    def __len__(self):
        return len(self._a)

    def __iter__(self):  # as on CuPy: 0-d (or sub-) arrays, never host scalars
        return (self[i] for i in range(len(self)))

    # -- NumPy interoperation: refused or dispatched --------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        if method == "at":  # ufunc.at(a, index[, b]): the index may be a tuple
            return _ufunc_at(ufunc, *inputs, what=what)
        for x in inputs:
            if isinstance(x, np.ndarray):
                raise _host_array_error(what)
            if not (isinstance(x, FakeArray) or _is_scalar(x)):
                return NotImplemented
        return _apply(getattr(ufunc, method), inputs, kwargs, what)

    def __array_function__(self, func, types, args, kwargs):
        if not all(issubclass(t, FakeArray) for t in types):
            if any(issubclass(t, np.ndarray) for t in types):
                raise _host_array_error(f"numpy.{func.__name__}")
            return NotImplemented
        return _apply(func, args, kwargs, f"numpy.{func.__name__}")

    # -- indexing -------------------------------------------------------------------------------
    def __getitem__(self, index):
        raw = _index(index, "indexing")
        out = self._a[raw]
        if isinstance(out, np.generic):  # a 0-d view, as CuPy returns
            out = self._a[(raw if isinstance(raw, tuple) else (raw,)) + (Ellipsis,)]
        return FakeArray(out)

    def __setitem__(self, index, value):
        self._a[_index(index, "item assignment")] = _value(value, "item assignment")

    # -- explicit transfers -------------------------------------------------------------------
    def get(self):
        """Device->host copy (cupy.ndarray.get)."""
        _count("d2h", "ndarray.get()")
        return self._a.copy()

    def set(self, host):
        """Host->device copy into this array (cupy.ndarray.set)."""
        if not isinstance(host, np.ndarray):
            raise TypeError("set() takes a numpy.ndarray")
        _count("h2d", "ndarray.set()")
        self._a[...] = host

    def item(self, *args):
        _count("d2h", "ndarray.item()")
        return self._a.item(*args)

    def tolist(self):
        _count("d2h", "ndarray.tolist()")
        return self._a.tolist()

    def _to_python(self, kind):
        if self.ndim != 0:
            raise TypeError(f"{kind.__name__}() of a {self.shape} device array: only 0-d arrays "
                            "convert to Python scalars")
        _count("d2h", f"{kind.__name__}() of a device scalar")
        return kind(self._a)

    __float__ = lambda self: self._to_python(float)  # noqa: E731
    __int__ = lambda self: self._to_python(int)  # noqa: E731
    __bool__ = lambda self: self._to_python(bool)  # noqa: E731
    __complex__ = lambda self: self._to_python(complex)  # noqa: E731

    # -- operators ----------------------------------------------------------------------------
    __add__, __radd__, __iadd__ = _binary(np.add)
    __sub__, __rsub__, __isub__ = _binary(np.subtract)
    __mul__, __rmul__, __imul__ = _binary(np.multiply)
    __truediv__, __rtruediv__, __itruediv__ = _binary(np.true_divide)
    __floordiv__, __rfloordiv__, __ifloordiv__ = _binary(np.floor_divide)
    __mod__, __rmod__, __imod__ = _binary(np.remainder)
    __pow__, __rpow__, __ipow__ = _binary(np.power)
    __matmul__, __rmatmul__, __imatmul__ = _binary(np.matmul)
    __and__, __rand__, __iand__ = _binary(np.bitwise_and)
    __or__, __ror__, __ior__ = _binary(np.bitwise_or)
    __xor__, __rxor__, __ixor__ = _binary(np.bitwise_xor)
    __lt__ = _binary(np.less)[0]
    __le__ = _binary(np.less_equal)[0]
    __gt__ = _binary(np.greater)[0]
    __ge__ = _binary(np.greater_equal)[0]
    __eq__ = _binary(np.equal)[0]
    __ne__ = _binary(np.not_equal)[0]
    __neg__ = lambda self: np.negative(self)  # noqa: E731
    __pos__ = lambda self: np.positive(self)  # noqa: E731
    __abs__ = lambda self: np.absolute(self)  # noqa: E731
    __invert__ = lambda self: np.invert(self)  # noqa: E731


ndarray = FakeArray

# ---------------------------------------------------------------------------------------------
# The module's functions
# ---------------------------------------------------------------------------------------------


def asarray(a, dtype=None, order=None):
    """A device array; from a host array (or list) this is the explicit host->device copy."""
    if isinstance(a, FakeArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, (np.ndarray, list, tuple)) or _is_scalar(a):
        _count("h2d", f"asarray of a host {type(a).__name__}")
    return FakeArray(np.array(_dev(a, "asarray") if not isinstance(a, np.ndarray) else a,
                              dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, FakeArray):
        return FakeArray(np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    out = asarray(a, dtype)
    return FakeArray(np.array(out._a, copy=False, ndmin=ndmin)) if ndmin else out


def asnumpy(a):
    """The explicit device->host copy (cupy.asnumpy)."""
    if isinstance(a, FakeArray):
        _count("d2h", "asnumpy")
        return a._a.copy()
    return np.asarray(a)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, FakeArray) for a in args) else np


class _Ufunc:
    """A device ufunc: fake_cupy.exp(host_array) raises, as cupy.exp does."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _apply(self._ufunc, args, kwargs, f"fake_cupy.{self.__name__}")

    def __getattr__(self, name):
        attr = getattr(self._ufunc, name)
        if name in ("at", "reduce", "accumulate", "outer", "reduceat"):
            what = f"fake_cupy.{self.__name__}.{name}"
            if name == "at":
                return lambda a, index, *b: _ufunc_at(self._ufunc, a, index, *b, what=what)
            return lambda *args, **kwargs: _apply(attr, args, kwargs, what)
        return attr


def _function(func, prefix="fake_cupy"):
    what = f"{prefix}.{func.__name__}"

    def device_function(*args, **kwargs):
        return _apply(func, args, kwargs, what)
    device_function.__name__ = func.__name__
    return device_function


class _Namespace:
    """fake_cupy.linalg, fake_cupy.fft, ...: NumPy's submodule with the same forwarding."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        return _function(obj, self._module.__name__) if callable(obj) and not isinstance(obj, type) else obj


def __getattr__(name):
    """Everything not defined above: NumPy's object of that name, working on device arrays."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        obj = getattr(np, name)
    except AttributeError:
        raise AttributeError(f"module 'fake_cupy' has no attribute {name!r}") from None
    if isinstance(obj, np.ufunc):
        obj = _Ufunc(obj)
    elif type(obj) is type(np):
        obj = _Namespace(obj)
    elif callable(obj) and not isinstance(obj, type):  # dtypes, finfo, ... pass through
        obj = _function(obj)
    globals()[name] = obj  # made once
    return obj


# ---------------------------------------------------------------------------------------------
# Random numbers: cupy.random.default_rng and the Generator methods the project may use
# ---------------------------------------------------------------------------------------------

class Generator:
    """cupy.random.Generator's sampling methods, drawing from NumPy's PCG64. Like CuPy's, it has
    no `permutation`, `shuffle`, `choice` or `normal` (use argsort of uniforms, μ + σ·ε)."""

    def __init__(self, seed):
        self._gen = np.random.default_rng(seed)

    def random(self, size=None, dtype=np.float64, out=None):
        return self._draw(self._gen.random(size, dtype=_float_dtype(dtype)), out)

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return self._draw(self._gen.standard_normal(size, dtype=_float_dtype(dtype)), out)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return FakeArray(np.asarray(self._gen.uniform(_dev(low, "uniform"), _dev(high, "uniform"),
                                                      size), dtype=dtype))

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return FakeArray(np.asarray(self._gen.integers(low, high, size, dtype, endpoint)))

    @staticmethod
    def _draw(sample, out):
        if out is None:
            return FakeArray(np.asarray(sample))
        out[...] = FakeArray(np.asarray(sample))
        return out


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"cupy.random.Generator draws float32 or float64, not {dtype}")
    return dtype


class _Random:
    Generator = Generator

    @staticmethod
    def default_rng(seed=None):
        return Generator(seed)

    def __getattr__(self, name):
        raise AttributeError(f"fake_cupy.random.{name} is left out on purpose: draw from "
                             "autodiff.rng (one seeded generator on the backend)")


random = _Random()


# ---------------------------------------------------------------------------------------------
# Out of memory: the two ways CuPy reports an exhausted device
# ---------------------------------------------------------------------------------------------

class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError: the memory pool could not allocate (a MemoryError)."""

    def __init__(self, size, total, limit=0):
        limit_text = f", limit set to: {limit:,} bytes" if limit else ""
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes{limit_text}).")


class CUDARuntimeError(RuntimeError):
    """cupy.cuda.runtime.CUDARuntimeError: an error code of the CUDA runtime, out of memory among
    them (a RuntimeError, raised outside the memory pool, e.g. by a library's workspace)."""

    def __init__(self, status=2, name="cudaErrorMemoryAllocation", text="out of memory"):
        self.status = status
        super().__init__(f"{name}: {text}")


CUDARuntimeError.__module__ = "cupy_backends.cuda.api.runtime"  # where CuPy defines it
cuda = types.SimpleNamespace(memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),  # their errors only
                             runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError))
