"""A tiny reverse-mode automatic differentiation engine over NumPy or CuPy.

Read this file top to bottom: the backend (which array module, one random generator, one way
back to the host), the Tensor and its backward pass, the primitives (each a forward line and
its gradient line), and the building blocks the models are made of (Linear, MLP, Gaussian
heads, BatchNorm, a parameter registry, Adam).

Gradient rules are first order and written with raw arrays: the backward pass builds no graph.
Sources: the design of HIPS autograd / autodidact (vector-Jacobian products, one unbroadcast
helper, iterative topological sort) and Chainer's `xp` pattern.
"""
import contextlib
import json
import math
import os

import numpy as np

# ---------------------------------------------------------------------------------------------
# Backend: one array module `xp`, chosen once; host transfers only through `to_numpy`.
# ---------------------------------------------------------------------------------------------

xp = np  # the array module in use: numpy, or cupy on a GPU


class BackendError(RuntimeError):
    """The requested device cannot be used (e.g. --device gpu without a working CuPy)."""


def _import_cupy():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return None


def set_device(name="auto"):
    """Choose the backend: 'cpu' (NumPy), 'gpu' (CuPy) or 'auto' (CuPy if it sees a device)."""
    if name not in ("auto", "cpu", "gpu"):
        raise BackendError(f"unknown device {name!r}; choose auto, cpu or gpu")
    module = np
    if name != "cpu":
        cupy = _import_cupy()
        if cupy is None and name == "gpu":
            raise BackendError("--device gpu needs CuPy and a CUDA device; neither was found "
                               "(pip install cupy-cuda12x, or use --device cpu)")
        module = cupy or np
    use_array_module(module)
    return device_name()


def use_array_module(module, seed=0):
    """Make `module` (numpy, cupy, or a stand-in with the same API) the array module."""
    global xp, rng
    xp = module
    rng = Random(seed)


def device_name():
    return "cpu" if xp is np else "gpu"


def to_numpy(array):
    """The one explicit device->host transfer: for logging, checkpoints and images."""
    if xp is np or isinstance(array, (np.ndarray, np.generic, float, int)):
        return np.asarray(array)
    return xp.asnumpy(array)


class Random:
    """One seeded generator on the backend (normal, uniform, Bernoulli, permutations).

    On NumPy its state can be saved and restored exactly (for bit-exact resume); other
    backends restore by reseeding from (seed, epoch), which is reproducible but not identical.
    """

    def __init__(self, seed=0):
        self.reseed(seed)

    def reseed(self, seed):
        self.seed = seed
        if xp is np:
            self._gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        else:
            flat = seed if isinstance(seed, int) else int(np.random.SeedSequence(seed).generate_state(1)[0])
            self._gen = xp.random.default_rng(flat)

    def normal(self, shape, dtype="float32"):
        return self._gen.standard_normal(shape, dtype=dtype)

    def uniform(self, shape, dtype="float32"):
        """Uniform on [0, 1)."""
        return self._gen.random(shape, dtype=dtype)

    def bernoulli(self, p):
        """Binary samples (in p's dtype) with success probabilities p."""
        return (self.uniform(p.shape, p.dtype) < p).astype(p.dtype)

    def permutation(self, n):
        """A random permutation of range(n), on the device."""
        return xp.argsort(self.uniform((n,), "float64"))

    def get_state(self):
        """A JSON string from which `set_state` continues the same stream (exactly on NumPy)."""
        state = {"seed": self.seed}
        if xp is np:
            state["numpy"] = self._gen.bit_generator.state
        return json.dumps(state)

    def set_state(self, text):
        state = json.loads(text)
        seed = state["seed"]
        self.reseed(tuple(seed) if isinstance(seed, list) else seed)
        if xp is np and "numpy" in state:
            self._gen.bit_generator.state = state["numpy"]


rng = Random(0)


try:  # ADGM_DEVICE picks the backend at import; train.py --device calls set_device again
    set_device(os.environ.get("ADGM_DEVICE", "auto"))
except BackendError:
    pass  # stay on NumPy here; an explicit set_device("gpu") reports the problem
