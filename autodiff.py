"""A tiny reverse-mode automatic differentiation engine over NumPy or CuPy.

Read this file top to bottom: the backend (which array module, one random generator, one way
back to the host), the Tensor and its backward pass, the primitives (each a forward line and
its gradient line), and the building blocks the models are made of (Linear, MLP, Gaussian
heads, BatchNorm, a parameter registry, Adam).

Gradient rules are first order and written with raw arrays: the backward pass builds no graph.
Sources: the design of HIPS autograd / autodidact (vector-Jacobian products, one unbroadcast
helper, a gradient rule per argument, no recursion) and Chainer's `xp` pattern.
"""
import contextlib
import heapq
import itertools
import json
import math
import numbers
import os

import numpy as np

# ---------------------------------------------------------------------------------------------
# Backend: one array module `xp`, chosen once; host transfers only through `to_numpy`.
# ---------------------------------------------------------------------------------------------

xp = np  # the array module in use: numpy, or cupy on a GPU
LOG_2PI = math.log(2 * math.pi)


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
        return np.array(array)  # a copy, as from a GPU: a snapshot must not change with training
    return xp.asnumpy(array)


class Random:
    """One seeded generator on the backend (normal, uniform, Bernoulli, permutations).

    Its state can be saved and restored, so a resumed run draws what an uninterrupted one would.
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
        """A JSON string from which `set_state` continues the same stream."""
        if xp is np:
            return json.dumps({"seed": self.seed, "numpy": self._gen.bit_generator.state})
        # CuPy's generator state cannot be read out: continue from here with a fresh seed drawn
        # from the stream itself, which set_state can then reproduce exactly.
        self.reseed(int(to_numpy(self._gen.integers(0, 2 ** 62, size=1))[0]))
        return json.dumps({"seed": self.seed})

    def set_state(self, text):
        state = json.loads(text)
        seed = state["seed"]
        self.reseed(tuple(seed) if isinstance(seed, list) else seed)
        if "numpy" in state:  # a CPU run's stream: continued on NumPy, checked on any backend
            bits = self._gen.bit_generator if xp is np else np.random.PCG64()
            bits.state = state["numpy"]


rng = Random(0)


# ---------------------------------------------------------------------------------------------
# Tensor and the backward pass
# ---------------------------------------------------------------------------------------------

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Evaluate without recording a graph (no parents kept, nothing to free)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


_averaging = True


@contextlib.contextmanager
def frozen_averages():
    """BatchNorm layers in training mode still normalise with the batch's own statistics, but
    leave their running averages as they are (the labeled half of a step: see adgm's loss)."""
    global _averaging
    previous, _averaging = _averaging, False
    try:
        yield
    finally:
        _averaging = previous


class Tensor:
    """An array of the backend plus what backward needs: its parents and a gradient rule."""
    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_seq", "__weakref__")
    __array_priority__ = 1000  # `numpy_scalar * tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad=False):
        # A NumPy array or a Python number (made float32) is copied to the device: an upload.
        self.data = xp.asarray(data, dtype="float32" if type(data) in (int, float) else None)
        self.grad, self.requires_grad = None, requires_grad
        self._parents, self._backward, self._seq = (), None, next(_created)

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def backward(self):
        """Accumulate d(self)/d(leaf) into every leaf's .grad; self must be a scalar. Nodes are
        taken latest-made first (a heap on the creation count): a node is made after its parents,
        so each comes after every node that uses it, its gradient complete. No recursion."""
        assert self.data.size == 1, "backward() starts from a scalar"
        if not self._parents:  # a leaf (or a constant) itself
            return _accumulate(self, xp.ones_like(self.data))
        grads, todo = {self: xp.ones_like(self.data)}, [(-self._seq, self)]
        while todo:
            node = heapq.heappop(todo)[1]
            for parent, pg in zip(node._parents, node._backward(grads.pop(node))):
                if pg is None or not parent.requires_grad:
                    continue
                assert pg.shape == parent.shape, (pg.shape, parent.shape, node._backward)
                if not parent._parents:
                    _accumulate(parent, pg)
                elif parent in grads:
                    grads[parent] = grads[parent] + pg
                else:
                    grads[parent] = pg
                    heapq.heappush(todo, (-parent._seq, parent))
            node._parents, node._backward = (), None  # free the graph as we go

    # Operators are defined after the primitives below.


_created = itertools.count()  # creation order of Tensors, for backward


def _accumulate(leaf, g):
    if leaf.grad is None:
        leaf.grad = g.copy()  # a copy: g may be another node's array
    else:
        leaf.grad += g  # in place: an optimizer's view stays valid


def _node(data, parents, backward):
    """A new Tensor; it keeps its parents and gradient rule only if one of them needs grad.

    backward(g) returns one gradient per parent (None where that parent needs none).
    """
    out = Tensor.__new__(Tensor)
    needed = _grad_enabled and any(p.requires_grad for p in parents)
    out.data, out.grad, out.requires_grad, out._seq = data, None, needed, next(_created)
    out._parents, out._backward = (parents, backward) if needed else ((), None)
    return out


def as_tensor(x, dtype):
    """x as a constant Tensor: a Tensor as it is; an array or list (NumPy's: an upload) in `dtype`."""
    return x if isinstance(x, Tensor) else Tensor(xp.asarray(x, dtype=dtype))


def sum_to(g, shape):
    """Undo broadcasting: sum g over the axes along which an operand of `shape` was expanded."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Primitives: a forward line and a gradient line each
# ---------------------------------------------------------------------------------------------

def _elementwise(forward, *rules):
    """A primitive computing forward(*arrays) elementwise, with one gradient rule per argument:
    rule(g, out, *arrays) is that argument's gradient before broadcasting is undone."""
    def primitive(*tensors):
        arrays = [t.data for t in tensors]
        out = forward(*arrays)
        return _node(out, tensors, lambda g: tuple(sum_to(rule(g, out, *arrays), t.shape) if t.requires_grad else None
                                                   for t, rule in zip(tensors, rules)))
    return primitive


def _sigmoid(x):
    # Cannot overflow, unlike 1 / (1 + exp(-x)); it rounds to 0 below x ≈ −17 (float32), which
    # is exact enough for gradients and image means (take log-probabilities from log_softmax).
    return 0.5 * (xp.tanh(0.5 * x) + 1)


# name = _elementwise(forward, the gradient rule of each argument)
add = _elementwise(lambda a, b: a + b, lambda g, out, a, b: g, lambda g, out, a, b: g)
sub = _elementwise(lambda a, b: a - b, lambda g, out, a, b: g, lambda g, out, a, b: -g)
mul = _elementwise(lambda a, b: a * b, lambda g, out, a, b: g * b, lambda g, out, a, b: g * a)
div = _elementwise(lambda a, b: a / b, lambda g, out, a, b: g / b, lambda g, out, a, b: -g * out / b)
logaddexp = _elementwise(lambda a, b: xp.logaddexp(a, b),  # log(e^a + e^b), stable
                         lambda g, out, a, b: g * xp.exp(a - out), lambda g, out, a, b: g * xp.exp(b - out))
neg = _elementwise(lambda a: -a, lambda g, out, a: -g)
exp = _elementwise(lambda a: xp.exp(a), lambda g, out, a: g * out)
log = _elementwise(lambda a: xp.log(a), lambda g, out, a: g / a)
sin = _elementwise(lambda a: xp.sin(a), lambda g, out, a: g * xp.cos(a))
relu = _elementwise(lambda a: xp.maximum(a, 0), lambda g, out, a: g * (a > 0))
sigmoid = _elementwise(lambda a: _sigmoid(a), lambda g, out, a: g * out * (1 - out))


def shift(a, c):
    """a + c for a Python number c, which CuPy passes to the kernel: no device array for it."""
    return _node(a.data + c, (a,), lambda g: (g,))


def scale(a, c):
    """a · c for a Python number c."""
    return _node(a.data * c, (a,), lambda g: (g * c,))


def power(a, p):
    """a ** p for a constant exponent p."""
    return _node(a.data ** p, (a,), lambda g: (g * p * a.data ** (p - 1),))


def matmul(a, b):
    """Matrix product of (..., n, k) and (..., k, m) arrays, broadcasting the leading axes."""
    assert a.ndim >= 2 and b.ndim >= 2, "matmul takes matrices (use reshape for vectors)"
    return _node(a.data @ b.data, (a, b),
                 lambda g: (sum_to(g @ b.data.swapaxes(-1, -2), a.shape) if a.requires_grad else None,
                            sum_to(a.data.swapaxes(-1, -2) @ g, b.shape) if b.requires_grad else None))


def linear(inputs, weights, bias=None, activation=None):
    """relu?(Σ_i x_i W_i + b) for inputs x_i (..., d_i) whose leading axes broadcast together.

    The same as composing matmul, add and relu, fused into one node for speed: a layer then
    makes one output array instead of 2 + 2·len(inputs), and the bias is added to the smallest
    projection before broadcasting (bench.py shows what this buys). Each x_i is projected at
    its own size, which is what makes the 'split first layer' cheap: x (B, 1, D) once per
    example, y (1, K, K) once per class, summed into (B, K, H).
    """
    pairs = sorted(zip(inputs, weights), key=lambda p: p[0].data.size)  # grow by broadcasting
    out = None
    for x, w in pairs:
        h = (x.data.reshape(-1, x.shape[-1]) @ w.data).reshape(x.shape[:-1] + w.shape[-1:])
        if out is None:
            out = h
            if bias is not None:
                out += bias.data  # in place: h is ours
        else:
            out = out + h
    parents = tuple(x for x, _ in pairs) + tuple(w for _, w in pairs) + ((bias,) if bias is not None else ())
    if activation == "relu" and _grad_enabled and any(p.requires_grad for p in parents):
        on = out > 0  # kept for backward: cheaper than comparing again
        out *= on
    elif activation == "relu":
        xp.maximum(out, 0, out=out)  # nothing to keep: one pass

    def backward(g):
        if activation == "relu":
            g = g * on
        gxs = [sum_to(g, x.shape[:-1] + w.shape[-1:]).reshape(-1, w.shape[-1]) for x, w in pairs]  # undo broadcasting
        return (tuple((gx @ w.data.T).reshape(x.shape) if x.requires_grad else None for (x, w), gx in zip(pairs, gxs))
                + tuple(x.data.reshape(-1, x.shape[-1]).T @ gx if w.requires_grad else None
                        for (x, w), gx in zip(pairs, gxs))
                + ((gxs[0].sum(axis=0),) if bias is not None else ()))  # the bias went with the smallest
    return _node(out, parents, backward)


def bernoulli_log_prob(x, logits):
    """Σ_d log Bern(x_d; sigmoid(l_d)) = Σ_d x·l − softplus(l) over the last axis, stable.

    One node for the widest elementwise work of a training step: softplus(l) = max(l, 0) +
    log(1 + e) with e = e^−|l| is one exp and one log, and the gradient x − sigmoid(l) reuses e,
    sigmoid(l) = max(e, [l ≥ 0]) / (1 + e). (log(1 + e) loses e < 2^-24 against 1: an absolute
    error below 6e-8, far under the float32 resolution of the sum.)
    """
    e = xp.exp(-abs(logits.data))
    one_plus_e = 1 + e
    out = (x.data * logits.data - xp.maximum(logits.data, 0) - xp.log(one_plus_e)).sum(axis=-1)

    def backward(g):
        sigmoid_l = xp.maximum(e, logits.data >= 0) / one_plus_e  # 1/(1 + e) for l ≥ 0, e/(1 + e) below
        g = xp.expand_dims(g, -1)
        return (sum_to(g * logits.data, x.shape) if x.requires_grad else None,
                sum_to(g * (x.data - sigmoid_l), logits.shape) if logits.requires_grad else None)
    return _node(out, (x, logits), backward)


def normal_log_prob(x, mu, logvar):
    """Σ_d log N(x_d; μ_d, σ_d²) over the last axis, log σ² given (Eq. 14-16), as one node: with
    d = x − μ and r = d·e^(−log σ²) it is −½ Σ (log 2π + log σ² + d·r), and the gradients are
    −r (x), r (μ) and ½(d·r − 1) (log σ²)."""
    d = x.data - mu.data
    r = d * xp.exp(-logvar.data)
    dr = d * r
    out = -0.5 * ((dr + logvar.data).sum(axis=-1) + dr.shape[-1] * LOG_2PI)

    def backward(g):
        g = xp.expand_dims(g, -1)
        return (-sum_to(g * r, x.shape) if x.requires_grad else None,
                sum_to(g * r, mu.shape) if mu.requires_grad else None,
                sum_to((dr - 1) * (0.5 * g), logvar.shape) if logvar.requires_grad else None)
    return _node(out, (x, mu, logvar), backward)


def normal_sample(mu, logvar, eps):
    """The reparameterised sample μ + σ·ε with σ = e^(log σ²/2) (Kingma & Welling 2014)."""
    sigma = xp.exp(0.5 * logvar.data)
    s = sigma * eps.data
    return _node(mu.data + s, (mu, logvar, eps),
                 lambda g: (sum_to(g, mu.shape) if mu.requires_grad else None,
                            0.5 * sum_to(g * s, logvar.shape) if logvar.requires_grad else None,
                            sum_to(g * sigma, eps.shape) if eps.requires_grad else None))


def batch_norm(x, gamma, beta, eps):
    """γ·x̂ + β with x̂ = (x − μ)/√(σ² + ε), μ and σ² the mean and (biased) variance of each
    feature over all leading axes, as one node (Ioffe & Szegedy 2015). With g' = γ·g the gradient
    of x is (g' − mean(g') − x̂·mean(g'·x̂))/√(σ² + ε); of γ, Σ g·x̂; of β, Σ g. Returns the node
    and the arrays μ, σ² (for running averages)."""
    axes = tuple(range(x.ndim - 1))
    mu = x.data.mean(axis=axes)
    centred = x.data - mu
    var = (centred * centred).mean(axis=axes)
    inv_std = 1 / xp.sqrt(var + eps)
    x_hat = centred
    x_hat *= inv_std  # in place: centred is ours
    out = x_hat * gamma.data
    out += beta.data

    def backward(g):
        g_hat = g * gamma.data
        gx = None
        if x.requires_grad:
            gx = g_hat - g_hat.mean(axis=axes)
            gx -= x_hat * (g_hat * x_hat).mean(axis=axes)
            gx *= inv_std
        return (gx,
                (g * x_hat).sum(axis=axes) if gamma.requires_grad else None,
                g.sum(axis=axes) if beta.requires_grad else None)
    return _node(out, (x, gamma, beta), backward), mu, var


def logsumexp(a, axis=-1, keepdims=False):
    """log Σ exp(a) along axis, with the maximum subtracted first."""
    m = a.data.max(axis=axis, keepdims=True)
    out = m + xp.log(xp.exp(a.data - m).sum(axis=axis, keepdims=True))
    return _node(out if keepdims else out.squeeze(axis), (a,),
                 lambda g: (g.reshape(out.shape) * xp.exp(a.data - out),))


def log_softmax(a, axis=-1):
    out = a.data - logsumexp(Tensor(a.data), axis, keepdims=True).data
    return _node(out, (a,), lambda g: (g - xp.exp(out) * g.sum(axis=axis, keepdims=True),))


def reduce_sum(a, axis=None, keepdims=False):
    def backward(g):
        if axis is not None and not keepdims:
            g = xp.expand_dims(g, axis)
        return (xp.broadcast_to(g, a.shape),)
    return _node(a.data.sum(axis=axis, keepdims=keepdims), (a,), backward)


def mean(a, axis=None, keepdims=False):
    total = reduce_sum(a, axis, keepdims)
    return total * (total.data.size / a.data.size)  # 1 / (the number of values in each sum)


def reshape(a, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return _node(a.data.reshape(shape), (a,), lambda g: (g.reshape(a.shape),))


def broadcast_to(a, shape):
    return _node(xp.broadcast_to(a.data, shape), (a,), lambda g: (sum_to(g, a.shape),))


def transpose(a, axes=None):
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(axes)
    inverse = tuple(int(i) for i in np.argsort(axes))
    return _node(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def getitem(a, index):
    """a[index] for slices and integer arrays; repeated indices add up in backward."""
    def backward(g):
        full = xp.zeros_like(a.data)
        if _is_basic(index):
            full[index] = g
        else:
            xp.add.at(full, index, g)  # scatter-add
        return (full,)
    return _node(a.data[index], (a,), backward)


def _is_basic(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in parts)


def concat(tensors, axis=-1):
    tensors = tuple(tensors)
    ends = np.cumsum([t.shape[axis] for t in tensors])[:-1].tolist()
    return _node(xp.concatenate([t.data for t in tensors], axis=axis), tensors,
                 lambda g: tuple(xp.split(g, ends, axis=axis)))


def sqrt(a):
    return a ** 0.5


def _operator(op, with_number, reflected=False):
    """A Tensor operator. A Python number goes to shift or scale as a scalar of the tensor's dtype
    (on CuPy a device array would be a copy to the device each time; NumPy 1.x would make a 0-d
    float32 times a Python float a float64); an array becomes a constant of the tensor's dtype."""
    def method(self, other):
        if isinstance(other, numbers.Number):
            return with_number(self, self.data.dtype.type(other))
        other = as_tensor(other, self.dtype)
        return op(other, self) if reflected else op(self, other)
    return method


Tensor.__add__, Tensor.__radd__ = _operator(add, shift), _operator(add, shift, reflected=True)
Tensor.__sub__ = _operator(sub, lambda a, c: shift(a, -c))
Tensor.__rsub__ = _operator(sub, lambda a, c: shift(neg(a), c), reflected=True)
Tensor.__mul__, Tensor.__rmul__ = _operator(mul, scale), _operator(mul, scale, reflected=True)
Tensor.__truediv__ = _operator(div, lambda a, c: scale(a, 1 / c))
Tensor.__rtruediv__ = _operator(div, lambda a, c: scale(power(a, -1), c), reflected=True)
Tensor.__matmul__ = lambda self, other: matmul(self, as_tensor(other, self.dtype))
Tensor.__pow__ = power
Tensor.__neg__ = neg
Tensor.__getitem__ = getitem
Tensor.sum = reduce_sum
Tensor.mean = mean
Tensor.reshape = reshape
Tensor.transpose = transpose
Tensor.T = property(transpose)


# ---------------------------------------------------------------------------------------------
# Building blocks: modules with named parameters, Linear, MLP, Gaussian heads, BatchNorm
# ---------------------------------------------------------------------------------------------

class Module:
    """A container whose Tensor attributes (and sub-modules, and lists of them) are its state.

    Tensors with requires_grad are parameters; others (BatchNorm's running averages) are
    buffers. Names are attribute paths, e.g. 'qz.net.layers.0.weight.0'.
    """
    training = True

    def named_tensors(self, prefix=""):
        for name, value in vars(self).items():
            items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
            for index, item in items:
                path = prefix + name + ("" if index is None else f".{index}")
                if isinstance(item, Tensor):
                    yield path, item
                elif isinstance(item, Module):
                    yield from item.named_tensors(path + ".")

    def parameters(self):
        """{name: Tensor} of every trainable parameter, in a fixed order."""
        return {name: t for name, t in self.named_tensors() if t.requires_grad}

    def modules(self):
        yield self
        for value in vars(self).values():
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(item, Module):
                    yield from item.modules()

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """{name: host array} of parameters and buffers, for checkpoints."""
        return {name: to_numpy(t.data) for name, t in self.named_tensors()}

    def load_state_dict(self, state):
        """Copy arrays in place (parameter views into an optimizer's buffer stay valid)."""
        own = dict(self.named_tensors())
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"parameters do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, t in own.items():
            if tuple(state[name].shape) != t.shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {t.shape}")
            t.data[...] = xp.asarray(state[name], dtype=t.dtype)


def parameter(array):
    return Tensor(array, requires_grad=True)


class Linear(Module):
    """y = Σ_i x_i W_i + b: one weight per input, so an input can be projected once and the
    projections added with broadcasting (the 'split first layer' of the y-enumerated networks).

    Weights are Glorot-normal, std = gain·sqrt(2 / (fan_in + fan_out)), or `std` if given.
    Inputs may have leading axes (..., d_i); they are flattened to one matmul per input.
    """

    def __init__(self, n_in, n_out, bias=True, gain=1.0, std=None, dtype="float32"):
        sizes = (int(n_in),) if np.ndim(n_in) == 0 else tuple(int(n) for n in n_in)
        std = gain * math.sqrt(2.0 / (sum(sizes) + n_out)) if std is None else std
        self.weight = [parameter(rng.normal((n, n_out), dtype) * std) for n in sizes]
        self.bias = parameter(xp.zeros(n_out, dtype=dtype)) if bias else None

    def __call__(self, *inputs, activation=None):
        assert len(inputs) == len(self.weight), "one input per weight matrix"
        return linear(inputs, self.weight, self.bias, activation)


class BatchNorm(Module):
    """Normalise features with batch statistics in training, running averages in evaluation
    (updated in training, except under frozen_averages)."""

    def __init__(self, n, momentum=0.1, eps=1e-5, dtype="float32"):
        self.gamma = parameter(xp.ones(n, dtype=dtype))
        self.beta = parameter(xp.zeros(n, dtype=dtype))
        self.running_mean = Tensor(xp.zeros(n, dtype=dtype))
        self.running_var = Tensor(xp.ones(n, dtype=dtype))
        self.momentum, self.eps = momentum, eps

    def __call__(self, x):
        if not self.training:
            scale = self.gamma / sqrt(self.running_var + self.eps)
            return (x - self.running_mean) * scale + self.beta
        out, mu, var = batch_norm(x, self.gamma, self.beta, self.eps)
        if _averaging:
            r = self.momentum
            self.running_mean.data[...] = (1 - r) * self.running_mean.data + r * mu
            self.running_var.data[...] = (1 - r) * self.running_var.data + r * var
        return out


class MLP(Module):
    """ReLU hidden layers; the first is a multi-input Linear (see Linear)."""

    def __init__(self, n_in, hidden, batchnorm=False, dtype="float32"):
        sizes = [n_in] + list(hidden)
        self.layers = [Linear(a, b, gain=math.sqrt(2.0), dtype=dtype) for a, b in zip(sizes, sizes[1:])]
        self.norms = [BatchNorm(n, dtype=dtype) for n in hidden] if batchnorm else []

    def __call__(self, *h):
        for i, layer in enumerate(self.layers):  # Linear, [BatchNorm,] ReLU
            h = (relu(self.norms[i](layer(*h))) if self.norms else layer(*h, activation="relu"),)
        return h[0]


class GaussianHead(Module):
    """Two linear heads giving μ and log σ² of a diagonal Gaussian (Eq. 15-16). By default they
    start small (std 1e-3), as in the authors' code, so the Gaussian starts near N(0, I);
    std=None gives Glorot weights instead."""

    def __init__(self, n_in, n_out, std=1e-3, dtype="float32"):
        self.mu = Linear(n_in, n_out, std=std, dtype=dtype)
        self.logvar = Linear(n_in, n_out, std=std, dtype=dtype)

    def __call__(self, h):
        return self.mu(h), self.logvar(h)


class Gaussian(Module):
    """A diagonal Gaussian N(μ, σ²) whose parameters an MLP computes (Eq. 14-16)."""

    def __init__(self, n_in, hidden, n_out, batchnorm=False, head_std=1e-3, dtype="float32"):
        self.net = MLP(n_in, hidden, batchnorm, dtype)
        self.head = GaussianHead(hidden[-1], n_out, head_std, dtype)

    def __call__(self, *inputs):
        return self.head(self.net(*inputs))


# ---------------------------------------------------------------------------------------------
# Adam (Kingma & Ba 2015) over one contiguous parameter buffer
# ---------------------------------------------------------------------------------------------

class Adam:
    """Adam with bias correction. The parameters are moved into one flat buffer (each
    parameter's .data and .grad become views into it), so an update is a handful of
    vectorised operations over ~10⁶ numbers instead of a Python loop over arrays."""

    chunk = 1 << 16  # on the CPU the update runs over slices this long: the five arrays of a slice stay in L2

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, clip=None, clip_value=None,
                 decay=0.0, decayed=()):
        """clip: rescale the gradient to a global norm of at most `clip`; clip_value: then clip
        each element to ±clip_value (the authors' code does both). decay·θ is added to the
        gradient of each parameter in `decayed` first: a Gaussian prior on them, as an L2 term."""
        self.params = list(params.values()) if isinstance(params, dict) else list(params)
        self.lr, self.betas, self.eps, self.clip, self.clip_value = lr, betas, eps, clip, clip_value
        self.decay, self.decayed = decay, [p for p in self.params if any(p is d for d in decayed)]
        dtype = self.params[0].dtype
        sizes = [p.data.size for p in self.params]
        self.flat = xp.empty(sum(sizes), dtype=dtype)
        self.flat_grad = xp.zeros(sum(sizes), dtype=dtype)
        offset = 0
        for p, n in zip(self.params, sizes):
            assert p.dtype == dtype, "all parameters share one dtype"
            self.flat[offset:offset + n] = p.data.ravel()
            p.data = self.flat[offset:offset + n].reshape(p.shape)
            p.grad = self.flat_grad[offset:offset + n].reshape(p.shape)
            offset += n
        self.m, self.v = xp.zeros_like(self.flat), xp.zeros_like(self.flat)  # first and second moments
        self.t = 0

    def zero_grad(self):
        self.flat_grad.fill(0)

    def grad_norm(self):
        """Global gradient norm, as a device scalar (no host sync)."""
        return xp.sqrt(xp.dot(self.flat_grad, self.flat_grad))

    def step(self):
        b1, b2 = self.betas
        for p in self.decayed if self.decay else ():  # d/dθ of decay·θ²/2
            p.grad += self.decay * p.data
        # Rescale so that the global norm is at most `clip`: a device scalar, no host sync.
        scale = (None if self.clip is None else
                 xp.minimum(1.0, self.clip / (self.grad_norm() + 1e-12)).astype(self.flat.dtype))
        self.t += 1
        # θ −= lr·m̂/(sqrt(v̂) + eps) with m̂ = m/(1 − b1^t), v̂ = v/(1 − b2^t): the corrections
        # folded into two numbers.
        c2 = math.sqrt(1 - b2 ** self.t)
        eps, lr = self.eps * c2, self.lr * c2 / (1 - b1 ** self.t)
        n = self.flat.size
        chunk = Adam.chunk if xp is np else n  # a GPU takes the whole buffer in one kernel a line
        scratch = xp.empty(min(chunk, n), dtype=self.flat.dtype)  # in place, through one scratch buffer
        for i in range(0, n, chunk):
            g, m, v, theta = (a[i:i + chunk] for a in (self.flat_grad, self.m, self.v, self.flat))
            s = scratch[:len(g)]
            if scale is not None:
                g *= scale
            if self.clip_value is not None:
                xp.clip(g, -self.clip_value, self.clip_value, out=g)
            xp.subtract(g, m, out=s); s *= 1 - b1; m += s           # m = b1·m + (1 − b1)·g
            xp.multiply(g, g, out=s); s -= v; s *= 1 - b2; v += s   # v = b2·v + (1 − b2)·g²
            xp.sqrt(v, out=s); s += eps
            xp.divide(m, s, out=s); s *= lr; theta -= s

    def state_dict(self):
        return {"m": to_numpy(self.m), "v": to_numpy(self.v), "t": np.asarray(self.t),
                "lr": np.asarray(self.lr)}

    def load_state_dict(self, state):
        self.m[...] = xp.asarray(state["m"])
        self.v[...] = xp.asarray(state["v"])
        self.t, self.lr = int(state["t"]), float(state["lr"])


try:  # ADGM_DEVICE picks the backend at import; train.py --device calls set_device again
    set_device(os.environ.get("ADGM_DEVICE", "auto"))
except BackendError:
    pass  # stay on NumPy here; an explicit set_device("gpu") reports the problem
