"""Tests for autodiff.py: gradient checks of every primitive and building block, the backward
pass (diamonds, deep chains, freeing the graph), no_grad, Adam, modules and the random generator.

Gradient checks are in float64, fixed seeds, central differences, small shapes,
broadcasting shapes (3,2)/(1,2)/(2,)/(), extreme inputs (±300, ±1000) for the stable ops, points
kept away from kinks, and the forward compared with an independent plain-NumPy formula.

`check_grad(f, *arrays)` tests a general vector-Jacobian product: loss = Σ f(...) * R with a
fixed random R, analytic gradients from backward(), numeric ones from central differences.
"""
import gc
import os
import weakref

import numpy as np
import pytest

import autodiff as ad

GRAD_TOL = 1e-6  # largest relative error allowed in a gradient check
EPS = 1e-6  # central-difference step
MAX_ERR = {"value": 0.0, "where": None}  # the largest relative error seen, reported at the end


# ---------------------------------------------------------------------------------------------
# The gradient-check helper
# ---------------------------------------------------------------------------------------------

def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _rel_err(analytic, numeric, overall):
    """max |analytic - numeric| relative to the larger of the two gradients' max-norms.

    A gradient that is exactly zero (a bias in front of BatchNorm) has no scale of its own:
    there the error is taken relative to `overall`, the largest gradient in the whole check.
    """
    scale = max(np.abs(analytic).max(initial=0.0), np.abs(numeric).max(initial=0.0))
    if np.abs(analytic).max(initial=0.0) <= 1e-12 * overall:
        scale = overall
    return 0.0 if scale == 0 else float(np.abs(analytic - numeric).max() / scale)


def check_grad(f, *arrays, params=(), eps=EPS, tol=GRAD_TOL):
    """Compare backward() with central differences for every input array and parameter.

    The arrays become float64 Tensors with requires_grad; `params` (a module's parameters, a
    dict or a list of Tensors) are perturbed in place through their .data. The loss is
    Σ_k (f(...)_k * R_k).sum() with fixed random R_k, so a whole vector-Jacobian product is
    checked, not just the gradient of a plain sum. Returns the largest relative error.
    """
    inputs = [ad.Tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    params = list(params.values()) if isinstance(params, dict) else list(params)
    targets = inputs + params
    for t in targets:
        assert t.dtype == np.float64, "gradient checks run in float64"
        t.grad = None

    outs = _as_tuple(f(*inputs))
    weights = [np.random.default_rng(1234 + k).standard_normal(o.shape) for k, o in enumerate(outs)]
    loss = None
    for o, r in zip(outs, weights):
        assert np.all(np.isfinite(o.data)), "forward is not finite"
        term = (o * r).sum()
        loss = term if loss is None else loss + term
    loss.backward()
    analytic = [np.zeros_like(t.data) if t.grad is None else np.array(t.grad) for t in targets]

    def values():
        with ad.no_grad():
            return [np.array(o.data) for o in _as_tuple(f(*inputs))]

    numeric = []
    for i, (t, ga) in enumerate(zip(targets, analytic)):
        assert ga.shape == t.shape and np.all(np.isfinite(ga)), f"target {i}: bad gradient {ga}"
        gn = np.zeros_like(ga)
        for idx in np.ndindex(t.shape):
            x0 = t.data[idx].copy()
            t.data[idx] = x0 + eps
            hi, plus = t.data[idx].copy(), values()
            t.data[idx] = x0 - eps
            lo, minus = t.data[idx].copy(), values()
            t.data[idx] = x0
            # Difference the outputs before weighting (less cancellation), divide by the step
            # actually taken (x0 ± eps is rounded at |x0| ~ 1000).
            diff = sum(float(((p - m) * r).sum()) for p, m, r in zip(plus, minus, weights))
            gn[idx] = diff / (hi - lo)
        numeric.append(gn)

    overall = max(max(np.abs(g).max(initial=0.0) for g in pair) for pair in zip(analytic, numeric))
    worst = 0.0
    for i, (t, ga, gn) in enumerate(zip(targets, analytic, numeric)):
        err = _rel_err(ga, gn, overall)
        worst = max(worst, err)
        assert err < tol, f"target {i} {t.shape}: relative error {err:.3g}\nanalytic\n{ga}\nnumeric\n{gn}"
    if worst > MAX_ERR["value"]:
        where = os.environ.get("PYTEST_CURRENT_TEST", getattr(f, "__name__", "?")).rsplit(" ", 1)[0]
        MAX_ERR.update(value=worst, where=where)
    return worst


@pytest.fixture(scope="module", autouse=True)
def report_max_error():
    yield
    print(f"\nlargest relative gradient-check error: {MAX_ERR['value']:.3g} ({MAX_ERR['where']})")


# ---------------------------------------------------------------------------------------------
# Per-primitive cases: (id, f, input makers); each maker draws one array from a seeded generator
# ---------------------------------------------------------------------------------------------

def N(*shape):  # standard normal
    return lambda r: r.standard_normal(shape)


def P(*shape):  # positive, away from 0 (log, div, sqrt, fractional powers)
    return lambda r: r.uniform(0.5, 2.0, shape)


def AWAY(*shape):  # either sign, |x| >= 0.2 (relu's kink)
    return lambda r: r.choice([-1.0, 1.0], shape) * r.uniform(0.2, 2.0, shape)


def U(*shape):  # in [0, 1]: Bernoulli observations (or their means)
    return lambda r: r.uniform(0.0, 1.0, shape)


def _sid(shape):
    return "x".join(map(str, shape)) or "()"


BCAST = [((3, 2), (3, 2)), ((3, 2), (1, 2)), ((3, 2), (2,)), ((3, 2), ()),
         ((2,), (3, 2)), ((1, 2), (3, 1))]

IDX_REP = np.array([0, 2, 0, 3, 0])  # repeated rows: backward must scatter-add

CASES = []


def case(name, f, *makers):
    CASES.append(pytest.param(f, makers, id=name))


for _name, _fn, _b in [("add", ad.add, N), ("sub", ad.sub, N), ("mul", ad.mul, N),
                       ("div", ad.div, P), ("logaddexp", ad.logaddexp, N)]:
    for _sa, _sb in BCAST:
        case(f"{_name}[{_sid(_sa)},{_sid(_sb)}]", _fn, N(*_sa), _b(*_sb))

# operators, with Python numbers lifted to constants
case("op a+b", lambda a, b: a + b, N(3, 2), N(2))
case("op a+2", lambda a: a + 2.0, N(3, 2))
case("op 2+a", lambda a: 2.0 + a, N(3, 2))
case("op a-b", lambda a, b: a - b, N(3, 2), N(1, 2))
case("op 2-a", lambda a: 2.0 - a, N(3, 2))
case("op a*b", lambda a, b: a * b, N(3, 2), N(3, 1))
case("op 3*a", lambda a: 3.0 * a, N(3, 2))
case("op a/b", lambda a, b: a / b, N(3, 2), P(2))
case("op 1/a", lambda a: 1.0 / a, P(3, 2))
case("op -a", lambda a: -a, N(3, 2))
case("neg", ad.neg, N(3, 2))
case("shift", lambda a: ad.shift(a, 2.5), N(3, 2))
case("scale", lambda a: ad.scale(a, -1.5), N(3, 2))
case("power a**2", lambda a: a ** 2, N(3, 2))
case("power a**3", lambda a: ad.power(a, 3), N(3, 2))
case("power a**0.5", lambda a: a ** 0.5, P(3, 2))
case("power a**-1.5", lambda a: a ** -1.5, P(3, 2))
case("sqrt", ad.sqrt, P(3, 2))

case("matmul 2d", ad.matmul, N(3, 4), N(4, 2))
case("matmul op a@b", lambda a, b: a @ b, N(3, 4), N(4, 2))
case("matmul batched", ad.matmul, N(5, 3, 4), N(5, 4, 2))
case("matmul bcast 2d@3d", ad.matmul, N(3, 4), N(2, 4, 5))
case("matmul bcast 3d@2d", ad.matmul, N(2, 3, 4), N(4, 5))
case("matmul bcast 1x3x4@2x4x2", ad.matmul, N(1, 3, 4), N(2, 4, 2))
case("matmul bcast 2x1x3x4@3x4x2", ad.matmul, N(2, 1, 3, 4), N(3, 4, 2))

case("exp", ad.exp, N(3, 2))
case("log", ad.log, P(3, 2))
case("sin", ad.sin, N(3, 2))
case("relu", ad.relu, AWAY(4, 3))
case("sigmoid", ad.sigmoid, N(3, 2))

case("bernoulli_log_prob", ad.bernoulli_log_prob, U(3, 4), N(3, 4))
case("bernoulli_log_prob binary x", ad.bernoulli_log_prob, lambda r: (r.uniform(size=(3, 4)) < 0.5) * 1.0, N(3, 4))
case("bernoulli_log_prob bcast x (3,4), logits (2,3,4)", ad.bernoulli_log_prob, U(3, 4), N(2, 3, 4))
case("bernoulli_log_prob bcast x (2,1,4), logits (3,4)", ad.bernoulli_log_prob, U(2, 1, 4), N(3, 4))

case("normal_log_prob", ad.normal_log_prob, N(3, 4), N(3, 4), N(3, 4))
case("normal_log_prob bcast x (2,3,4), mu logvar (3,4)", ad.normal_log_prob, N(2, 3, 4), N(3, 4), N(3, 4))
case("normal_log_prob bcast x (2,1,4), mu (2,3,4), logvar (1,3,4)", ad.normal_log_prob,
     N(2, 1, 4), N(2, 3, 4), N(1, 3, 4))
case("normal_log_prob at its own sample", lambda m, v, e: ad.normal_log_prob(ad.normal_sample(m, v, e), m, v),
     N(3, 4), N(3, 4), N(2, 3, 4))
case("normal_sample", ad.normal_sample, N(3, 4), N(3, 4), N(3, 4))
case("normal_sample bcast mu logvar (3,4), eps (2,3,4)", ad.normal_sample, N(3, 4), N(3, 4), N(2, 3, 4))
case("normal_sample bcast mu (2,1,4), logvar (3,4), eps (2,3,4)", ad.normal_sample, N(2, 1, 4), N(3, 4), N(2, 3, 4))

case("batch_norm", lambda x, g, b: ad.batch_norm(x, g, b, 1e-5)[0], N(6, 4), P(4), N(4))
case("batch_norm 3d", lambda x, g, b: ad.batch_norm(x, g, b, 1e-5)[0], N(2, 5, 4), P(4), N(4))

case("logsumexp axis=-1", ad.logsumexp, N(3, 4))
case("logsumexp axis=0", lambda a: ad.logsumexp(a, axis=0), N(3, 4))
case("logsumexp axis=1 keepdims", lambda a: ad.logsumexp(a, axis=1, keepdims=True), N(2, 3, 4))
case("logsumexp axis=(0,2)", lambda a: ad.logsumexp(a, axis=(0, 2)), N(2, 3, 4))
case("logsumexp axis=None keepdims", lambda a: ad.logsumexp(a, axis=None, keepdims=True), N(3, 4))
case("logsumexp axis=None", lambda a: ad.logsumexp(a, axis=None), N(3, 4))
case("log_softmax axis=-1", ad.log_softmax, N(3, 4))
case("log_softmax axis=0", lambda a: ad.log_softmax(a, axis=0), N(3, 4))
case("log_softmax axis=1 3d", lambda a: ad.log_softmax(a, axis=1), N(2, 3, 4))

for _axis, _keep in [(None, False), (None, True), (0, False), (-1, False), (1, True),
                     ((0, 2), False), ((0, -1), True)]:
    case(f"reduce_sum axis={_axis} keepdims={_keep}",
         lambda a, axis=_axis, keep=_keep: ad.reduce_sum(a, axis, keep), N(2, 3, 4))
    case(f"mean axis={_axis} keepdims={_keep}",
         lambda a, axis=_axis, keep=_keep: ad.mean(a, axis, keep), N(2, 3, 4))
case("Tensor.sum()", lambda a: a.sum(), N(3, 2))
case("Tensor.sum(axis=0)", lambda a: a.sum(axis=0), N(3, 2))
case("Tensor.mean(axis=1, keepdims)", lambda a: a.mean(axis=1, keepdims=True), N(3, 2))

case("reshape tuple", lambda a: a.reshape((6, 4)), N(2, 3, 4))
case("reshape varargs -1", lambda a: ad.reshape(a, 4, -1), N(2, 3, 4))
case("reshape flat", lambda a: a.reshape(24), N(2, 3, 4))
case("transpose .T", lambda a: a.T, N(3, 2))
case("transpose default 3d", lambda a: a.transpose(), N(2, 3, 4))
case("transpose axes=(1,2,0)", lambda a: ad.transpose(a, (1, 2, 0)), N(2, 3, 4))

case("getitem slice", lambda a: a[1:3], N(4, 3))
case("getitem reversed cols", lambda a: a[:, ::-1], N(4, 3))
case("getitem int", lambda a: a[2], N(4, 3))
case("getitem numpy int", lambda a: a[np.int64(1)], N(4, 3))
case("getitem ellipsis", lambda a: a[..., 1], N(4, 3))
case("getitem None", lambda a: a[None, 1:], N(4, 3))
case("getitem repeated rows", lambda a: a[IDX_REP], N(4, 3))
case("getitem repeated rows, slice", lambda a: a[IDX_REP, 1:], N(4, 3))
case("getitem repeated pairs", lambda a: a[np.array([1, 1, 3]), np.array([2, 2, 0])], N(4, 3))
case("getitem list", lambda a: a[[3, 3, 1]], N(4, 3))
case("getitem boolean mask", lambda a: a[np.array([True, False, True, True])], N(4, 3))

case("concat axis=-1", lambda a, b, c: ad.concat([a, b, c]), N(3, 2), N(3, 1), N(3, 4))
case("concat axis=0", lambda a, b: ad.concat([a, b], axis=0), N(1, 2), N(3, 2))
case("concat same tensor twice", lambda a: ad.concat([a, a], axis=0), N(2, 3))


@pytest.mark.parametrize("f, makers", CASES)
def test_primitive_gradient(f, makers):
    r = np.random.default_rng(0)
    check_grad(f, *[make(r) for make in makers])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("f, makers", CASES)
def test_primitive_keeps_dtype(f, makers, dtype):
    """float32 in -> float32 out (forward and gradients); float64 in -> float64 out."""
    r = np.random.default_rng(0)
    xs = [ad.Tensor(make(r).astype(dtype), requires_grad=True) for make in makers]
    outs = _as_tuple(f(*xs))
    assert all(o.dtype == dtype for o in outs), [o.dtype for o in outs]
    loss = outs[0].sum()
    for o in outs[1:]:
        loss = loss + o.sum()
    assert loss.dtype == dtype
    loss.backward()
    assert all(x.grad is not None and x.grad.dtype == dtype for x in xs), [x.grad for x in xs]


# ---------------------------------------------------------------------------------------------
# Stable ops at extreme inputs: forward equals an independent NumPy formula, gradients check
# ---------------------------------------------------------------------------------------------

X_EXT = np.array([[-1000.0, -300.0, -1.5],
                  [0.5, 300.0, 1000.0],
                  [1000.0, 1000.0, -1000.0],
                  [-1000.0, -1000.0, -1000.0],
                  [300.0, -300.0, 1000.0]])
Y_EXT = np.array([[1000.0, -1000.0, 300.0],
                  [-300.0, 300.0, 1000.0],
                  [-1000.0, 1000.0, -1000.0],
                  [1000.0, -300.0, 0.25],
                  [-1000.0, 300.0, -2.0]])


def ref_softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def ref_sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def ref_logaddexp(a, b):
    return np.maximum(a, b) + np.log1p(np.exp(-np.abs(a - b)))


def ref_logsumexp(x, axis, keepdims=False):
    return np.logaddexp.reduce(x, axis=axis, keepdims=keepdims)


def ref_bernoulli_log_prob(x, logits):
    return (x * logits - ref_softplus(logits)).sum(axis=-1)  # log sigmoid(l) = -softplus(-l)


X_BIN = (np.arange(15).reshape(5, 3) % 2) * 1.0  # binary observations beside X_EXT as logits


EXTREME = [
    pytest.param(ad.sigmoid, ref_sigmoid, (X_EXT,), id="sigmoid"),
    pytest.param(ad.bernoulli_log_prob, ref_bernoulli_log_prob, (X_BIN, X_EXT), id="bernoulli_log_prob"),
    pytest.param(ad.bernoulli_log_prob, ref_bernoulli_log_prob, (1 - X_BIN, X_EXT), id="bernoulli_log_prob 1-x"),
    pytest.param(ad.logaddexp, ref_logaddexp, (X_EXT, Y_EXT), id="logaddexp"),
    pytest.param(ad.logaddexp, ref_logaddexp, (X_EXT, Y_EXT[0]), id="logaddexp bcast (5,3)+(3,)"),
    pytest.param(ad.logsumexp, lambda x: ref_logsumexp(x, -1), (X_EXT,), id="logsumexp axis=-1"),
    pytest.param(lambda a: ad.logsumexp(a, axis=0, keepdims=True),
                 lambda x: ref_logsumexp(x, 0, True), (X_EXT,), id="logsumexp axis=0 keepdims"),
    pytest.param(ad.log_softmax, lambda x: x - ref_logsumexp(x, -1, True), (X_EXT,),
                 id="log_softmax axis=-1"),
    pytest.param(lambda a: ad.log_softmax(a, axis=0), lambda x: x - ref_logsumexp(x, 0, True),
                 (X_EXT,), id="log_softmax axis=0"),
]


@pytest.mark.parametrize("f, ref, arrays", EXTREME)
def test_stable_op_at_extreme_inputs(f, ref, arrays):
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        out = f(*[ad.Tensor(a) for a in arrays]).data
    expected = ref(*arrays)
    assert out.shape == expected.shape
    assert np.all(np.isfinite(out))
    # Relative agreement; the absolute floor (1e-15 of the output's scale) only matters where
    # the value is tiny next to the others, e.g. sigmoid(-300) ~ 5e-131 next to values ~1.
    atol = 1e-15 * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=atol)
    check_grad(f, *arrays)


def test_normal_primitives_match_plain_numpy():
    """The fused Gaussian log-density and reparameterised sample against their textbook forms."""
    r = np.random.default_rng(5)
    x, mu, logvar, eps = r.standard_normal((2, 3, 4)), r.standard_normal((3, 4)), r.standard_normal((2, 1, 4)), \
        r.standard_normal((2, 3, 4))
    sigma2 = np.exp(logvar)
    expected = (-0.5 * np.log(2 * np.pi * sigma2) - (x - mu) ** 2 / (2 * sigma2)).sum(axis=-1)
    got = ad.normal_log_prob(ad.Tensor(x), ad.Tensor(mu), ad.Tensor(logvar)).data
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    sample = ad.normal_sample(ad.Tensor(mu), ad.Tensor(logvar), ad.Tensor(eps)).data
    np.testing.assert_allclose(sample, mu + np.sqrt(sigma2) * eps, rtol=1e-13)


def test_python_numbers_stay_numbers():
    """a + 2, 3·a, a / 4, 2 − a, 1 / a: one node each with the number inside (no constant
    Tensor made of it), and float32 stays float32."""
    a = ad.Tensor(np.array([1.0, 2.0], np.float32), requires_grad=True)
    for out in (a + 2, 3 * a, a / 4, a - np.float64(1), 2.0 + a):
        assert out.dtype == np.float32 and len(out._parents) == 1 and out._parents[0] is a
    for out in (2 - a, 1 / a):
        assert out.dtype == np.float32 and all(p.requires_grad for p in out._parents)
    np.testing.assert_array_equal((2 - a).data, [1.0, 0.0])
    np.testing.assert_array_equal((1 / a).data, [1.0, 0.5])


def test_sigmoid_saturates_exactly_and_is_symmetric():
    x = ad.Tensor(np.array([-1000.0, -300.0, -3.0, 0.0, 3.0, 300.0, 1000.0]), requires_grad=True)
    s = ad.sigmoid(x)
    np.testing.assert_allclose(s.data + s.data[::-1], 1.0, rtol=0, atol=1e-15)
    assert s.data[-1] == 1.0 and s.data[0] == 0.0 and s.data[3] == 0.5
    s.sum().backward()
    assert np.all(np.isfinite(x.grad)) and x.grad[0] == 0.0 and x.grad[-1] == 0.0


# ---------------------------------------------------------------------------------------------
# Building blocks: Linear, MLP, Gaussian, BatchNorm
# ---------------------------------------------------------------------------------------------

def _normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_linear_single_input_gradient():
    lin = ad.Linear(3, 4, dtype="float64")
    lin.bias.data[...] = _normal(4, seed=1)

    def linear_single(x):
        return lin(x)
    check_grad(linear_single, _normal(5, 3), params=lin.parameters())


def test_linear_leading_axes_gradient():
    lin = ad.Linear(3, 4, dtype="float64")

    def linear_leading_axes(x):
        return lin(x)
    assert linear_leading_axes(ad.Tensor(_normal(2, 5, 3))).shape == (2, 5, 4)
    check_grad(linear_leading_axes, _normal(2, 5, 3), params=lin.parameters())


def test_linear_without_bias_gradient():
    lin = ad.Linear(3, 2, bias=False, dtype="float64")
    assert list(lin.parameters()) == ["weight.0"]

    def linear_no_bias(x):
        return lin(x)
    check_grad(linear_no_bias, _normal(4, 3), params=lin.parameters())


def test_linear_multi_input_broadcast_gradient():
    """x (5, 3) and y (2, 1, 2), projected separately and added with broadcasting: (2, 5, 4)."""
    lin = ad.Linear((3, 2), 4, dtype="float64")
    lin.bias.data[...] = _normal(4, seed=1)

    def linear_multi_input(x, y):
        return lin(x, y)
    assert linear_multi_input(ad.Tensor(_normal(5, 3)), ad.Tensor(_normal(2, 1, 2))).shape == (2, 5, 4)
    check_grad(linear_multi_input, _normal(5, 3, seed=2), _normal(2, 1, 2, seed=3), params=lin.parameters())


def test_linear_split_first_layer_equals_concatenated_linear():
    """Σ_i x_i W_i + b == [x_1, x_2] [W_1; W_2] + b, also when the inputs broadcast."""
    multi = ad.Linear((3, 2), 4, dtype="float64")
    multi.bias.data[...] = _normal(4, seed=1)
    single = ad.Linear(5, 4, dtype="float64")
    single.weight[0].data[...] = np.concatenate([w.data for w in multi.weight], axis=0)
    single.bias.data[...] = multi.bias.data
    x, y = _normal(6, 3, seed=2), _normal(6, 2, seed=3)
    np.testing.assert_allclose(multi(ad.Tensor(x), ad.Tensor(y)).data,
                               single(ad.Tensor(np.concatenate([x, y], axis=-1))).data, rtol=1e-12, atol=1e-12)
    yb = _normal(2, 1, 2, seed=4)  # e.g. K enumerated classes, broadcast over the batch
    both = np.concatenate([np.broadcast_to(x, (2, 6, 3)), np.broadcast_to(yb, (2, 6, 2))], axis=-1)
    np.testing.assert_allclose(multi(ad.Tensor(x), ad.Tensor(yb)).data, single(ad.Tensor(both)).data,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_mlp_gradient(batchnorm):
    mlp = ad.MLP((3, 2), [6, 5], batchnorm=batchnorm, dtype="float64")

    def mlp_forward(x, y):
        return mlp(x, y)
    check_grad(mlp_forward, _normal(4, 3, seed=1), _normal(2, 1, 2, seed=2), params=mlp.parameters())


def test_gaussian_gradient():
    gauss = ad.Gaussian(3, [6], 2, dtype="float64")
    for name, p in gauss.parameters().items():  # larger heads than the 1e-3 start: a stronger check
        if not name.startswith("net."):
            p.data[...] = _normal(*p.shape, seed=5) * 0.5

    def gaussian_forward(x):
        return gauss(x)
    mu, logvar = gaussian_forward(ad.Tensor(_normal(4, 3)))
    assert mu.shape == logvar.shape == (4, 2)
    check_grad(gaussian_forward, _normal(4, 3, seed=1), params=gauss.parameters())


def _batchnorm(n=4):
    bn = ad.BatchNorm(n, dtype="float64")
    bn.gamma.data[...] = np.random.default_rng(7).uniform(0.5, 1.5, n)
    bn.beta.data[...] = _normal(n, seed=8)
    return bn


@pytest.mark.parametrize("shape", [(6, 4), (2, 5, 4)], ids=_sid)
def test_batchnorm_training_forward_and_gradient(shape):
    bn = _batchnorm()
    x = _normal(*shape, seed=1) * 2 + 1
    out = bn(ad.Tensor(x)).data
    axes = tuple(range(x.ndim - 1))
    mu, var = x.mean(axis=axes), x.var(axis=axes)
    np.testing.assert_allclose(out, (x - mu) / np.sqrt(var + bn.eps) * bn.gamma.data + bn.beta.data,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean.data, 0.9 * 0 + 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.data, 0.9 * 1 + 0.1 * var, rtol=1e-12)

    def batchnorm_train(x):
        return bn(x)
    check_grad(batchnorm_train, x, params=bn.parameters())


def test_batchnorm_eval_uses_running_averages():
    bn = _batchnorm()
    bn.running_mean.data[...] = _normal(4, seed=2)
    bn.running_var.data[...] = np.random.default_rng(3).uniform(0.5, 2.0, 4)
    rm, rv = bn.running_mean.data.copy(), bn.running_var.data.copy()
    bn.eval()
    assert not bn.training
    x = _normal(6, 4, seed=1) * 2 + 1
    out = bn(ad.Tensor(x)).data
    np.testing.assert_allclose(out, (x - rm) / np.sqrt(rv + bn.eps) * bn.gamma.data + bn.beta.data,
                               rtol=1e-12, atol=1e-12)

    def batchnorm_eval(x):
        return bn(x)
    check_grad(batchnorm_eval, x, params=bn.parameters())
    np.testing.assert_array_equal(bn.running_mean.data, rm)  # evaluation leaves them alone
    np.testing.assert_array_equal(bn.running_var.data, rv)


def test_batchnorm_under_frozen_averages_normalises_by_the_batch_and_keeps_its_averages():
    bn = _batchnorm()
    x = _normal(6, 4, seed=1) * 2 + 1
    with ad.frozen_averages():
        out = bn(ad.Tensor(x)).data
    np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + bn.eps) * bn.gamma.data + bn.beta.data,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(bn.running_mean.data, np.zeros(4))
    np.testing.assert_array_equal(bn.running_var.data, np.ones(4))
    bn(ad.Tensor(x))  # and outside it, they follow the batch again
    np.testing.assert_allclose(bn.running_mean.data, 0.1 * x.mean(0), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocks_keep_dtype(dtype):
    gauss = ad.Gaussian((3, 2), [5], 2, batchnorm=True, dtype=dtype)
    x = ad.Tensor(_normal(4, 3).astype(dtype), requires_grad=True)
    y = ad.Tensor(_normal(2, 1, 2).astype(dtype))
    mu, logvar = gauss(x, y)
    assert mu.dtype == logvar.dtype == dtype and mu.shape == (2, 4, 2)
    (mu.sum() + logvar.sum()).backward()
    assert x.grad.dtype == dtype
    assert all(p.grad is not None and p.grad.dtype == dtype for p in gauss.parameters().values())


# ---------------------------------------------------------------------------------------------
# The backward pass: diamonds, deep chains, freeing the graph, no_grad
# ---------------------------------------------------------------------------------------------

def test_diamond_add_then_mul():
    """b = a + a; c = b * b  =>  c = 4a², dc/da = 8a."""
    a0 = np.array([[0.5, -1.5], [2.0, 0.25]])
    a = ad.Tensor(a0, requires_grad=True)
    b = a + a
    c = b * b
    c.sum().backward()
    np.testing.assert_allclose(a.grad, 8 * a0, rtol=1e-15)


def test_diamond_add_then_add():
    """b = a + a; c = b + b  =>  dc/da = 4 (a visited-set bug gives 2 or 8)."""
    a = ad.Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    b = a + a
    c = b + b
    c.sum().backward()
    np.testing.assert_array_equal(a.grad, [4.0, 4.0, 4.0])


def test_diamonds_at_different_depths():
    def reused(a):
        b = ad.exp(a) * a  # a reaches the output along paths of different lengths
        c = b + a
        return c * b + ad.sigmoid(c) * a
    check_grad(reused, _normal(3, 2))


def test_deep_chain_of_100000_nodes():
    """y = a·c^N with N = 100 000 multiplications: no recursion error, exact gradients."""
    n, a0, c0 = 100_000, 1.5, 1.00001
    a = ad.Tensor(np.array(a0), requires_grad=True)
    c = ad.Tensor(np.array(c0), requires_grad=True)
    y = a
    for _ in range(n):
        y = y * c
    y.backward()
    np.testing.assert_allclose(y.data, a0 * c0 ** n, rtol=1e-9)
    np.testing.assert_allclose(a.grad, c0 ** n, rtol=1e-9)  # dy/da = c^N
    np.testing.assert_allclose(c.grad, n * a0 * c0 ** (n - 1), rtol=1e-9)  # dy/dc = N a c^(N-1)


def test_graph_is_freed_after_backward():
    """Intermediates die by reference counting alone once backward ran and the output is gone."""
    gc.disable()
    try:
        x = ad.Tensor(_normal(4, 3), requires_grad=True)
        w = ad.Tensor(_normal(3, 2, seed=1), requires_grad=True)
        h = ad.sigmoid(x @ w)
        p = ad.log_softmax(h)
        refs = [weakref.ref(h), weakref.ref(p)]
        out = (p * h).sum()
        del h, p
        assert all(r() is not None for r in refs), "the graph should hold intermediates before backward"
        out.backward()
        assert out._parents == () and out._backward is None
        del out
        assert all(r() is None for r in refs), "an intermediate Tensor outlived backward()"
        assert x.grad is not None and w.grad is not None
    finally:
        gc.enable()


def _live_tensors():
    gc.collect()
    return sum(isinstance(o, ad.Tensor) for o in gc.get_objects())


def test_live_tensor_count_stays_flat_over_200_steps():
    model = ad.Gaussian((4, 2), [8], 3, batchnorm=True, dtype="float64")
    opt = ad.Adam(model.parameters(), lr=1e-3)
    r = np.random.default_rng(0)
    xs, ys = r.standard_normal((5, 16, 4)), r.standard_normal((5, 16, 2))
    losses, counts = [], []

    def step(i):
        mu, logvar = model(ad.Tensor(xs[i % 5]), ad.Tensor(ys[i % 5]))
        loss = 0.5 * (mu * mu + ad.exp(logvar) - logvar).sum()  # KL(q || N(0, I)) + const
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.data)

    for i in range(200):
        losses.append(step(i))
        if i % 20 == 19:
            counts.append(_live_tensors())
    assert counts[0] > 0
    assert max(counts) == counts[0], f"live Tensors grow: {counts}"
    assert losses[-1] < losses[0]  # and it did train


def test_leaf_gradients_accumulate_across_backward_calls():
    x = ad.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0 + 2.0, 3.0 + 4.0])


def test_no_grad_records_nothing():
    x = ad.Tensor(_normal(3, 2), requires_grad=True)
    lin = ad.Linear(2, 2, dtype="float64")
    with ad.no_grad():
        results = [x + 1.0, x * x, ad.exp(x), ad.logsumexp(x), x[IDX_REP[:2]], x.T, lin(x),
                   ad.concat([x, x]), x.sum()]
        with ad.no_grad():  # nested
            results.append(ad.sigmoid(x))
        results.append(ad.sigmoid(x))  # still off after the inner block
    for r in results:
        assert r.requires_grad is False and r._parents == () and r._backward is None
    assert ad.exp(x).requires_grad and ad.exp(x)._parents == (x,)  # recording again

    with pytest.raises(RuntimeError):
        with ad.no_grad():
            raise RuntimeError("boom")
    assert (x * 2.0).requires_grad, "no_grad must restore recording after an exception"


def test_constants_do_not_record_a_graph():
    a, b = ad.Tensor(_normal(2)), ad.Tensor(_normal(2))
    c = a * b + 1.0
    assert not c.requires_grad and c._parents == ()


# ---------------------------------------------------------------------------------------------
# Adam
# ---------------------------------------------------------------------------------------------

def _textbook_adam(theta, grads, lrs, b1, b2, eps, clip=None, clip_value=None, decay=None):
    """Kingma & Ba (2015), Algorithm 1, one step per gradient, written out plainly; `decay` is
    a vector of per-element L2 coefficients added to the gradient before any clipping."""
    theta = theta.copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if decay is not None:
            g = g + decay * theta
        if clip is not None:
            g = g * min(1.0, clip / np.linalg.norm(g))
        if clip_value is not None:
            g = np.clip(g, -clip_value, clip_value)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


P0 = np.array([0.5, -1.0, 2.0])
Q0 = np.array([[0.3], [-0.2]])
GRADS = [np.array([0.2, -0.004, 1.5, 0.01, -0.3]),  # step 1, as one flat vector (p then q)
         np.array([-0.1, 0.002, 1.0, 0.5, -0.3])]  # step 2


def _adam_run(grads, lrs=None, decay_q=None, **kw):
    """Two parameters (shapes (3,) and (2,1)) fed known gradients through backward()."""
    p, q = ad.parameter(P0.copy()), ad.parameter(Q0.copy())
    if decay_q is not None:
        kw.update(decay=decay_q, decayed=[q])
    opt = ad.Adam({"p": p, "q": q}, lr=(lrs or [0.1])[0], **kw)
    for i, g in enumerate(grads):
        if lrs:
            opt.lr = lrs[i]
        opt.zero_grad()
        loss = (p * g[:3]).sum() + (q * g[3:].reshape(2, 1)).sum()  # d loss/d(p, q) = g
        loss.backward()
        opt.step()
    return np.concatenate([p.data.ravel(), q.data.ravel()]), opt


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_two_steps_match_textbook(eps):
    theta0 = np.concatenate([P0, Q0.ravel()])
    for steps in (1, 2):
        got, _ = _adam_run(GRADS[:steps], betas=(0.9, 0.999), eps=eps)
        expected = _textbook_adam(theta0, GRADS[:steps], [0.1] * steps, 0.9, 0.999, eps)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_adam_settable_lr():
    theta0 = np.concatenate([P0, Q0.ravel()])
    got, opt = _adam_run(GRADS, lrs=[0.1, 0.01], eps=1e-3)
    np.testing.assert_allclose(got, _textbook_adam(theta0, GRADS, [0.1, 0.01], 0.9, 0.999, 1e-3),
                               rtol=1e-12, atol=1e-12)
    assert float(opt.state_dict()["lr"]) == 0.01


def test_adam_gradient_norm_clipping():
    """Step 1 has norm 5 (rescaled to 1), step 2 norm 0.58 (left alone)."""
    grads = [np.array([3.0, 0.0, 0.0, 4.0, 0.0]), np.array([0.3, 0.3, 0.0, -0.4, 0.0])]
    theta0 = np.concatenate([P0, Q0.ravel()])
    got, opt = _adam_run(grads, eps=1e-3, clip=1.0)
    clipped = _textbook_adam(theta0, grads, [0.1, 0.1], 0.9, 0.999, 1e-3, clip=1.0)
    unclipped = _textbook_adam(theta0, grads, [0.1, 0.1], 0.9, 0.999, 1e-3)
    assert np.abs(clipped - unclipped).max() > 1e-2  # the case tells clipping apart
    np.testing.assert_allclose(got, clipped, rtol=1e-12, atol=1e-12)
    opt.zero_grad()
    assert float(opt.grad_norm()) == 0.0


@pytest.mark.parametrize("chunk", [None, 2], ids=["one slice", "slices of 2"])
def test_adam_norm_clip_then_element_clip_then_prior(chunk, monkeypatch):
    """The authors' order: the prior's gradient added, the global norm rescaled to 1, then each
    element clipped to ±0.3 (step 1: norm 5; step 2: one element 0.4 > 0.3 after rescaling).
    The update runs over slices of the buffer; with slices of 2 the norm is still global."""
    if chunk:
        monkeypatch.setattr(ad.Adam, "chunk", chunk)
    grads = [np.array([3.0, 0.0, 0.0, 4.0, 0.0]), np.array([0.3, 0.1, 0.0, -0.4, 0.0])]
    theta0 = np.concatenate([P0, Q0.ravel()])
    decay = np.array([0.0, 0.0, 0.0, 0.5, 0.5])  # only q is decayed
    got, _ = _adam_run(grads, eps=1e-3, clip=1.0, clip_value=0.3, decay_q=0.5)
    expected = _textbook_adam(theta0, grads, [0.1, 0.1], 0.9, 0.999, 1e-3, clip=1.0, clip_value=0.3, decay=decay)
    without = _textbook_adam(theta0, grads, [0.1, 0.1], 0.9, 0.999, 1e-3, clip=1.0)
    assert np.abs(expected - without).max() > 1e-2
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_adam_grad_norm_is_global():
    p, q = ad.parameter(P0.copy()), ad.parameter(Q0.copy())
    opt = ad.Adam([p, q])
    ((p * np.array([3.0, 0.0, 0.0])).sum() + (q * np.array([[0.0], [4.0]])).sum()).backward()
    assert float(opt.grad_norm()) == pytest.approx(5.0, rel=1e-15)


def _resume_model():
    return ad.Gaussian((4, 2), [6], 3, batchnorm=True, dtype="float64")


def _train(model, opt, steps):
    for i in steps:
        r = np.random.default_rng(100 + i)  # the data of step i, whoever runs it
        mu, logvar = model(ad.Tensor(r.standard_normal((8, 4))), ad.Tensor(r.standard_normal((8, 2))))
        loss = 0.5 * (mu * mu + ad.exp(logvar) - logvar).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _params_after_resume(save, load):
    """Train 4 steps, checkpoint with save(), train 4 more; restore into a fresh model and
    optimizer with load() and train the same 4. Returns both final states."""
    ad.use_array_module(np, seed=1)
    model = _resume_model()
    opt = ad.Adam(model.parameters(), lr=0.01, clip=5.0)
    _train(model, opt, range(4))
    checkpoint = save(model.state_dict(), opt.state_dict())
    _train(model, opt, range(4, 8))  # the uninterrupted run

    ad.use_array_module(np, seed=2)  # a differently initialised model
    fresh = _resume_model()
    fresh_opt = ad.Adam(fresh.parameters(), lr=0.5)
    model_state, opt_state = load(checkpoint)
    fresh.load_state_dict(model_state)
    fresh_opt.load_state_dict(opt_state)
    _train(fresh, fresh_opt, range(4, 8))
    return model.state_dict(), fresh.state_dict()


def test_adam_resume_from_checkpoint_file(tmp_path):
    def save(model_state, opt_state):
        path = tmp_path / "ckpt.npz"
        np.savez(path, **{"model/" + k: v for k, v in model_state.items()},
                 **{"opt/" + k: v for k, v in opt_state.items()})
        return path

    def load(path):
        with np.load(path) as z:
            return ({k[6:]: z[k] for k in z.files if k.startswith("model/")},
                    {k[4:]: z[k] for k in z.files if k.startswith("opt/")})

    uninterrupted, resumed = _params_after_resume(save, load)
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


def test_adam_resume_from_in_memory_state_dicts():
    """state_dict() must be a snapshot: training on afterwards must not change it."""
    uninterrupted, resumed = _params_after_resume(lambda m, o: (m, o), lambda c: c)
    for name in uninterrupted:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Module: names, state_dict round trip, mismatches
# ---------------------------------------------------------------------------------------------

class Encoder(ad.Module):
    """Nested modules, a list of modules, a multi-input Linear and buffers: the naming scheme."""

    def __init__(self):
        self.first = ad.Linear((3, 2), 4, dtype="float64")
        self.blocks = [ad.BatchNorm(4, dtype="float64"), ad.Linear(4, 2, bias=False, dtype="float64")]
        self.scale = ad.parameter(np.ones(2))
        self.step = 0  # not a Tensor: not state


def test_parameter_names_follow_attribute_paths():
    enc = Encoder()
    assert list(enc.parameters()) == ["first.weight.0", "first.weight.1", "first.bias",
                                      "blocks.0.gamma", "blocks.0.beta", "blocks.1.weight.0", "scale"]
    assert list(enc.state_dict()) == ["first.weight.0", "first.weight.1", "first.bias",
                                      "blocks.0.gamma", "blocks.0.beta", "blocks.0.running_mean",
                                      "blocks.0.running_var", "blocks.1.weight.0", "scale"]


def _gaussian():
    return ad.Gaussian((3, 2), [5, 4], 2, batchnorm=True, dtype="float64")


def test_parameter_names_are_stable_and_unique():
    model = _gaussian()
    names = list(model.parameters())
    all_names = [name for name, _ in model.named_tensors()]
    assert len(names) == 13  # 3 + 2 linear weights/biases, 2 x 2 BatchNorm, 2 x 2 heads
    assert len(all_names) == len(set(all_names)) == len(names) + 4  # + running mean/var x 2
    assert len({id(t) for _, t in model.named_tensors()}) == len(all_names)
    assert list(_gaussian().parameters()) == names  # a second instance
    model.eval()
    model(ad.Tensor(_normal(4, 3)), ad.Tensor(_normal(4, 2)))
    ad.Adam(model.parameters())  # moves .data into a flat buffer
    assert list(model.parameters()) == names and list(model.state_dict()) == all_names


def test_module_state_dict_round_trip():
    ad.use_array_module(np, seed=1)
    a = _gaussian()
    a(ad.Tensor(_normal(6, 3)), ad.Tensor(_normal(6, 2)))  # move the running averages
    state = {k: np.array(v) for k, v in a.state_dict().items()}  # as written to a checkpoint
    ad.use_array_module(np, seed=2)
    b = _gaussian()
    assert not np.array_equal(b.state_dict()["net.layers.0.weight.0"], state["net.layers.0.weight.0"])
    b.load_state_dict(state)
    for name, t in b.named_tensors():
        np.testing.assert_array_equal(t.data, state[name], err_msg=name)
        assert t.dtype == np.float64
    a.eval(), b.eval()
    x, y = ad.Tensor(_normal(3, 3)), ad.Tensor(_normal(3, 2))
    for out_a, out_b in zip(a(x, y), b(x, y)):
        np.testing.assert_array_equal(out_a.data, out_b.data)


def test_module_state_dict_is_a_snapshot():
    """Training on after state_dict() must not change it; load_state_dict of it restores."""
    model = _gaussian()
    snapshot = model.state_dict()
    original = {k: np.array(v) for k, v in snapshot.items()}
    for t in model.parameters().values():  # training on, in place as Adam does
        t.data[...] += 1.0
    for name, value in snapshot.items():
        np.testing.assert_array_equal(value, original[name], err_msg=f"{name}: state_dict() aliases the live array")
    model.load_state_dict(snapshot)
    for name, t in model.named_tensors():
        np.testing.assert_array_equal(t.data, original[name], err_msg=name)


def test_load_state_dict_rejects_a_mismatch():
    model = _gaussian()
    state = {k: np.array(v) for k, v in model.state_dict().items()}
    bias = next(name for name in state if name.endswith("bias"))
    missing = dict(state)
    del missing[bias]
    extra = dict(state, **{"head.scale": np.ones(2)})
    wrong_shape = dict(state, **{bias: np.zeros(state[bias].size + 1)})
    for bad in (missing, extra, wrong_shape):
        with pytest.raises(ValueError):
            model.load_state_dict(bad)
    with pytest.raises(ValueError):
        ad.Gaussian((3, 2), [5], 2, dtype="float64").load_state_dict(state)  # another architecture


# ---------------------------------------------------------------------------------------------
# Random
# ---------------------------------------------------------------------------------------------

def _draws(r):
    p = np.full((7,), 0.5, dtype="float32")
    return [r.normal((3, 2)), r.uniform((5,)), r.bernoulli(p), r.permutation(9), r.normal((4,), "float64")]


def _assert_same_draws(first, second):
    for u, v in zip(first, second):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


def test_same_seed_same_draws():
    _assert_same_draws(_draws(ad.Random(7)), _draws(ad.Random(7)))
    assert not np.array_equal(ad.Random(7).normal((10,)), ad.Random(8).normal((10,)))
    ad.use_array_module(np, seed=3)
    w1 = ad.Linear(4, 3).weight[0].data.copy()
    ad.use_array_module(np, seed=3)
    np.testing.assert_array_equal(ad.Linear(4, 3).weight[0].data, w1)  # same seed, same init


@pytest.mark.parametrize("seed", [11, (11, 3)], ids=["int seed", "(seed, epoch)"])
def test_get_state_set_state_resumes_the_stream(seed):
    r = ad.Random(seed)
    r.uniform((3,))  # an odd number of float32 draws leaves half a 64-bit word buffered
    state = r.get_state()
    expected = _draws(r)
    r.set_state(state)
    _assert_same_draws(_draws(r), expected)
    other = ad.Random(999)
    other.set_state(state)
    _assert_same_draws(_draws(other), expected)
    assert other.seed == seed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bernoulli_mean_is_p(dtype):
    p = np.broadcast_to(np.array([0.0, 0.1, 0.5, 0.9, 1.0], dtype=dtype), (20000, 5))
    x = ad.rng.bernoulli(p)
    assert x.dtype == dtype and x.shape == p.shape
    assert set(np.unique(x).tolist()) <= {0.0, 1.0}
    # 5 standard errors of a mean of 20000 draws at p = 0.5 is 0.018
    np.testing.assert_allclose(x.mean(axis=0), p[0], atol=0.018)
    assert x[:, 0].sum() == 0 and x[:, 4].all()


def test_permutation_is_a_permutation():
    a, b = ad.rng.permutation(50), ad.rng.permutation(50)
    assert np.issubdtype(a.dtype, np.integer)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(np.sort(b), np.arange(50))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(50))


def test_normal_and_uniform_moments_and_dtypes():
    n = ad.rng.normal((20000,))
    u = ad.rng.uniform((20000,), "float64")
    assert n.dtype == np.float32 and u.dtype == np.float64
    assert abs(n.mean()) < 0.04 and abs(n.std() - 1) < 0.03
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
