"""Tests of adgm.py, the models and their bounds.

- dJ/dθ of the whole objective J against central differences (float64, fixed noise), for every
  model and over every parameter tensor;
- the enumerated unlabeled bound −U(x) (Eq. 11, 17) against a Python loop over classes, and the
  labeled bound, the L-layer auxiliary VAE and the potential model against plain-NumPy formulas;
- the split first layer against one matmul on the tiled, concatenated input;
- the bounds against a known log Z, and the importance-weighted bound rising with K;
- a one-hot q(y|a,x) turning −U(x) into −L(x,y); the deterministic-a ablation and M2 having no
  a-terms; shapes and dtypes of every output; a short sanity run that learns.
"""
import math

import numpy as np
import pytest

import adgm
from authors import models as authors
from cli import kinds
import autodiff as ad

D, K, A, Z, H = 5, 3, 2, 2, (6,)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def perturb(model, seed=1, scale=0.3):
    """Move every parameter to a generic point: no ReLU at its kink, no near-zero heads, γ ≠ 1."""
    gen = np.random.default_rng(seed)
    for p in model.parameters().values():
        p.data += (scale * gen.standard_normal(p.shape)).astype(p.dtype)
    return model


def tiny(cls, dtype="float64", seed=0, **kw):
    """A small semi-supervised model (D=5, K=3, one hidden layer of 6, A=Z=2) at a generic point."""
    ad.rng.reseed(seed)
    return perturb(cls(D, K, H, A, Z, dtype=dtype, **kw), seed + 1)


def batch(B_l=3, B_u=4, seed=3, binary=True, dtype="float64"):
    """x_l (B_l, D), y_l (B_l,) covering every class, x_u (B_u, D)."""
    gen = np.random.default_rng(seed)
    x_l, x_u = gen.random((B_l, D)), gen.random((B_u, D))
    if binary:
        x_l, x_u = (x_l < 0.5) * 1.0, (x_u < 0.5) * 1.0
    return x_l.astype(dtype), np.arange(B_l) % K, x_u.astype(dtype)


def fixed_noise(B_l, B_u, S, seed=2, dtype="float64"):
    """ε under the names the semi-supervised models ask for (their draw)."""
    gen = np.random.default_rng(seed)
    shapes = {"a_l": (S, B_l, A), "z_l": (S, B_l, 1, Z), "a_u": (S, B_u, A), "z_u": (S, B_u, K, Z)}
    return {name: gen.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def gaussian_energy(m1=1.0, m2=-0.5, s1=0.5, s2=1.5):
    """U(z) = ½((z1−m1)²/s1² + (z2−m2)²/s2²), whose log Z = log(2π s1 s2)."""
    def U(z1, z2, ops):
        return 0.5 * ((z1 - m1) ** 2 / s1 ** 2 + (z2 - m2) ** 2 / s2 ** 2)
    return U, math.log(2 * math.pi * s1 * s2)


def max_gradient_error(model, objective, per_tensor=3, h=1e-5, seed=0):
    """The largest relative error of backward() against central differences, over `per_tensor`
    random coordinates of every parameter. objective() must be deterministic (fixed noise).

    Relative error |n − g| / max(|n|, |g|, 1e-3): the floor keeps round-off in the difference
    quotient (~1e-10 here) from counting as an error on gradients that are (nearly) zero.
    One more check covers every coordinate at once: the derivative along a random direction v
    of all parameters, (J(θ + hv) − J(θ − hv)) / 2h, against Σ ∂J/∂θ · v."""
    params = model.parameters()
    for p in params.values():
        p.grad = None
    objective().backward()
    gen, worst = np.random.default_rng(seed), (0.0, None)
    v = {name: gen.standard_normal(p.shape) for name, p in params.items()}
    along = sum(float((p.grad * v[name]).sum()) for name, p in params.items() if p.grad is not None)
    values = []
    for sign in (1, -1):
        for name, p in params.items():
            p.data += sign * h * v[name]
        values.append(float(objective().data))
        for name, p in params.items():
            p.data -= sign * h * v[name]
    numeric = (values[0] - values[1]) / (2 * h)
    worst = (abs(numeric - along) / max(abs(numeric), abs(along), 1e-3),
             f"along a random direction: numeric {numeric:.10g}, backward {along:.10g}")
    for name, p in params.items():
        flat = p.data.reshape(-1)
        assert np.shares_memory(flat, p.data)
        for i in gen.choice(flat.size, size=min(per_tensor, flat.size), replace=False):
            keep = flat[i]
            flat[i] = keep + h
            up = float(objective().data)
            flat[i] = keep - h
            down = float(objective().data)
            flat[i] = keep
            numeric = (up - down) / (2 * h)
            exact = 0.0 if p.grad is None else float(p.grad.reshape(-1)[i])  # None: J ignores p
            error = abs(numeric - exact) / max(abs(numeric), abs(exact), 1e-3)
            if error >= worst[0]:
                worst = (error, f"{name}[{i}]: numeric {numeric:.10g}, backward {exact:.10g}")
    return worst


# ---------------------------------------------------------------------------------------------
# Gradient of the objective J (float64, central differences, fixed noise)
# ---------------------------------------------------------------------------------------------

def study(cls, qy_average=False, loss_average="halves", authors_order=False):
    """cls as train.py builds it with those options (authors.study_class)."""
    return authors.study_class(cls, dict(qy_average=qy_average, loss_average=loss_average, authors_order=authors_order))


SEMI = [("ADGM", adgm.ADGM, {}),
        ("ADGM-x_in_pa", adgm.ADGM, {"x_in_pa": True}),
        ("ADGM-batchnorm", adgm.ADGM, {"batchnorm": True}),
        ("SDGM", adgm.SDGM, {}),
        ("SDGM-gaussian", adgm.SDGM, {"likelihood": "gaussian"}),
        ("SDGM-qy_average", study(adgm.SDGM, qy_average=True), {}),
        ("M2", adgm.M2, {}),
        ("M2-rows", study(adgm.M2, loss_average="rows"), {}),
        ("ADGMDeterministic", adgm.ADGMDeterministic, {}),
        ("ADGMAuthors", authors.ADGMAuthors, {}),
        ("ADGMAuthors-rows-indexing", study(authors.ADGMAuthors, loss_average="rows", authors_order=True), {}),
        ("ADGMAuthorsDeterministic", authors.ADGMAuthorsDeterministic, {})]


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed noise", "live generator"])
@pytest.mark.parametrize("cls, kw", [c[1:] for c in SEMI], ids=[c[0] for c in SEMI])
def test_loss_takes_both_halves_together_as_the_bounds_take_them_one_by_one(cls, kw, fixed):
    """loss() draws for the two halves at once, through q(a|x) and q(y|a,x) as one batch. Its
    J and dJ/dθ equal those of J assembled from labeled_bound(x_l, y_l) and unlabeled_bound(x_u)
    each run on its own half, with their own draws; with the live generator too, so the draws
    come in the same order (a_l, z_l, a_u, z_u)."""
    S, alpha = 2, 2.5
    model = tiny(cls, **kw)
    x_l, y_l, x_u = batch(binary=kw.get("likelihood") != "gaussian")
    x_l, x_u = ad.Tensor(x_l), ad.Tensor(x_u)
    results = []
    for together in (True, False):
        model.noise = adgm.Noise(fixed_noise(len(y_l), x_u.shape[0], S) if fixed else None)
        ad.rng.reseed(7)
        for p in model.parameters().values():
            p.grad = None
        if together:
            J = model.loss(x_l, y_l, x_u, alpha, S, 0.7)[0]
        else:
            minus_L, log_qy, _, _ = model.labeled_bound(x_l, y_l, S, 0.7)
            minus_U = model.unlabeled_bound(x_u, S, 0.7)[0]
            J = model.objective(-minus_L - alpha * log_qy, -minus_U)
        J.backward()
        results.append((float(J.data), {k: p.grad.copy() for k, p in model.parameters().items() if p.grad is not None}))
    (J1, g1), (J2, g2) = results
    np.testing.assert_allclose(J1, J2, rtol=1e-12)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        np.testing.assert_allclose(g1[name], g2[name], rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("cls, kw", [c[1:] for c in SEMI], ids=[c[0] for c in SEMI])
def test_the_model_takes_arrays_of_any_float_dtype_in_its_own(cls, kw):
    """A float32 model given float64 NumPy arrays (a notebook's default) computes in float32, as
    it does from float32 Tensors, with the same numbers; and so do its evaluation calls."""
    model = tiny(cls, dtype="float32", **kw)
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise({k: v.astype("float32") for k, v in fixed_noise(len(y_l), len(x_u), 1).items()})
    J_arrays = model.loss(x_l, y_l, x_u, 2.5)[0]
    J_tensors = model.loss(ad.Tensor(x_l.astype("float32")), y_l, ad.Tensor(x_u.astype("float32")), 2.5)[0]
    assert J_arrays.dtype == np.float32 and float(J_arrays.data) == float(J_tensors.data)
    J_arrays.backward()
    assert all(p.grad.dtype == np.float32 for p in model.parameters().values() if p.grad is not None)
    model.noise = adgm.Noise()
    assert model.log_likelihood(x_u, iw_samples=2).dtype == model.evaluate(x_u, 2)[2].dtype == np.float32
    assert model.encode(x_u)[1].dtype == model.generate(y_l, np.zeros((3, Z))).dtype == np.float32


def test_the_trained_objective_is_made_of_the_two_bounds(monkeypatch):
    """loss takes J from labeled_bound and unlabeled_bound themselves (README's −L(x,y) and −U(x)),
    each called once on its half: with what they return moved by a constant, J moves with it,
    J = mean_l[−(−L) − α·log q(y_l|a,x_l)] + mean_u[−(−U)] of the values they returned."""
    model, alpha, shift = tiny(adgm.SDGM), 2.5, {"labeled_bound": 0.25, "unlabeled_bound": 0.5}
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), 2))
    J = float(model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), alpha, 2)[0].data)
    returned = {}
    for name in shift:
        def moved(self, *args, bound=getattr(adgm.SemiSupervised, name), name=name, **kw):
            assert name not in returned
            value, *rest = bound(self, *args, **kw)
            returned[name] = (value + shift[name], *rest)
            return returned[name]
        monkeypatch.setattr(adgm.SemiSupervised, name, moved)
    J_moved = float(model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), alpha, 2)[0].data)
    (minus_L, log_qy_label, _, _), (minus_U, _, _, _) = returned["labeled_bound"], returned["unlabeled_bound"]
    assert minus_L.shape == (len(y_l),) and minus_U.shape == (len(x_u),)
    expected = (-minus_L.data - alpha * log_qy_label.data).mean() + (-minus_U.data).mean()
    np.testing.assert_allclose(J_moved, expected, rtol=1e-13)
    np.testing.assert_allclose(J - J_moved, 0.75, rtol=1e-9)


@pytest.mark.parametrize("cls, kw", [c[1:] for c in SEMI], ids=[c[0] for c in SEMI])
def test_gradient_of_the_semi_supervised_objective(cls, kw):
    """J of Eq. 12-13 (mean_l[L − α log q(y|a,x)] + mean_u[U], or the mean of all rows), with S = 2
    samples and T = 0.7."""
    S = 2
    model = tiny(cls, **kw)
    x_l, y_l, x_u = batch(binary=kw.get("likelihood") != "gaussian")
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), S))
    args = (ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, S, 0.7)
    error, where = max_gradient_error(model, lambda: model.loss(*args)[0])
    print(f"\nmax relative error of dJ/dθ, {cls.__name__} {kw}: {error:.2e} ({where})")
    assert error < 1e-6, where


@pytest.mark.parametrize("layers, likelihood, batchnorm", [(1, "bernoulli", False), (2, "gaussian", True)],
                         ids=["L1-bernoulli", "L2-gaussian-batchnorm"])
def test_gradient_of_the_auxiliary_vae_objective(layers, likelihood, batchnorm):
    """−(Eq. 2 bound) of the L-layer auxiliary VAE (Eq. 19-20), S = 2, T = 0.7."""
    S, B = 2, 4
    ad.rng.reseed(0)
    model = perturb(adgm.AuxiliaryVAE(D, layers, H, A, Z, likelihood, batchnorm, dtype="float64"))
    x = ad.Tensor(batch(B_u=B, binary=likelihood == "bernoulli")[2])
    if layers == 1:  # fixed noise by name ...
        gen = np.random.default_rng(5)
        model.noise = adgm.Noise({"a0": gen.standard_normal((S, B, A)), "z0": gen.standard_normal((S, B, Z))})
        objective = lambda: model.loss(x, S, 0.7)[0]                                # noqa: E731
    else:  # ... or, equivalently, the same stream of the backend generator every time

        def objective():
            ad.rng.reseed(5)
            return model.loss(x, S, 0.7)[0]
    error, where = max_gradient_error(model, objective)
    print(f"\nmax relative error of dJ/dθ, AuxiliaryVAE L={layers}: {error:.2e} ({where})")
    assert error < 1e-6, where


@pytest.mark.parametrize("auxiliary", [True, False], ids=["auxiliary", "plain"])
def test_gradient_of_the_potential_objective(auxiliary):
    """−(Eq. 18 bound) of the 2-D potential model, 5 samples."""
    S = 5
    U, _ = gaussian_energy()
    ad.rng.reseed(0)
    model = perturb(adgm.PotentialModel(U, auxiliary, hidden=(6,), a_dim=A, dtype="float64"), scale=0.2)
    gen = np.random.default_rng(5)
    model.noise = adgm.Noise({"q": gen.standard_normal((S, A if auxiliary else 2)),
                              "z": gen.standard_normal((S, 2))})
    error, where = max_gradient_error(model, lambda: model.loss(S)[0])
    print(f"\nmax relative error of dJ/dθ, PotentialModel auxiliary={auxiliary}: {error:.2e} ({where})")
    assert error < 1e-6, where


# ---------------------------------------------------------------------------------------------
# The sum over y (Eq. 11, 17) against an explicit loop over classes
# ---------------------------------------------------------------------------------------------

LOOP = [("ADGM", adgm.ADGM, {}), ("ADGM-x_in_pa", adgm.ADGM, {"x_in_pa": True}), ("SDGM", adgm.SDGM, {}),
        ("SDGM-gaussian", adgm.SDGM, {"likelihood": "gaussian"}), ("M2", adgm.M2, {}),
        ("ADGMDeterministic", adgm.ADGMDeterministic, {})]


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("cls, kw", [c[1:] for c in LOOP], ids=[c[0] for c in LOOP])
def test_enumerated_unlabeled_bound_equals_a_loop_over_classes(cls, kw, S):
    """−U(x) = mean_s Σ_y q(y|a_s,x) (−L_s(x,y) − log q(y|a_s,x)), where −L_s(x,y) is the labeled
    bound of class y with the s-th a and the (s, y)-th z of the enumerated pass (S = 1 each)."""
    B, T = 4, 0.7
    model = tiny(cls, **kw)
    x = ad.Tensor(batch(B_u=B, binary=kw.get("likelihood") != "gaussian")[2])
    noise = fixed_noise(B, B, S)
    model.noise = adgm.Noise({"a_u": noise["a_u"], "z_u": noise["z_u"]})
    minus_U = model.unlabeled_bound(x, S, T)[0].data                                 # (B,)

    expected = np.zeros(B)
    for s in range(S):
        model.noise = adgm.Noise({"a_u": noise["a_u"][s:s + 1]})
        a = model._sample_a(x, 1)[0]
        log_qy = model.log_qy(x, a).data[0]                                          # (B, K)
        qy = np.exp(log_qy)
        np.testing.assert_allclose(qy.sum(axis=-1), 1.0, rtol=1e-12)
        for c in range(K):
            model.noise = adgm.Noise({"a_l": noise["a_u"][s:s + 1], "z_l": noise["z_u"][s:s + 1, :, c:c + 1]})
            minus_L = model.labeled_bound(x, np.full(B, c), 1, T)[0].data           # (B,)
            expected += qy[:, c] * (minus_L - log_qy[:, c]) / S
    np.testing.assert_allclose(minus_U, expected, rtol=1e-12, atol=1e-12)


def test_multi_sample_unlabeled_bound_from_per_sample_pieces():
    """S = 3: −U averages over a-samples *outside* the sum over y. Built again from f of each
    class (one class axis at a time, the same a) and log q(y|a_s,x) of each sample."""
    S, B = 3, 4
    model = tiny(adgm.SDGM)
    x = ad.Tensor(batch(B_u=B)[2])
    noise = fixed_noise(B, B, S)
    model.noise = adgm.Noise({"a_u": noise["a_u"], "z_u": noise["z_u"]})
    minus_U = model.unlabeled_bound(x, S)[0].data

    a = model._sample_a(x, S)[0]                                                     # (S, B, A)
    log_qy = model.log_qy(x, a).data                                                 # (S, B, K)
    f = np.empty((S, B, K))
    for c in range(K):
        model.noise = adgm.Noise({"a_l": noise["a_u"], "z_l": noise["z_u"][:, :, c:c + 1]})
        y = ad.Tensor(np.broadcast_to(np.eye(K)[c], (B, 1, K)))                       # (B, 1, K)
        q = model.draw([(x, 1, "l")], S)[0]
        np.testing.assert_array_equal(q.a.data, a.data)
        f[:, :, c] = model.f(x, y, q)[0].data[..., 0]
    expected = (np.exp(log_qy) * (f - log_qy)).sum(axis=-1).mean(axis=0)
    np.testing.assert_allclose(minus_U, expected, rtol=1e-12)
    # The wrong place for the expectation (q(y) of one sample against f averaged over samples)
    # gives a different number here, so the test can tell the two apart.
    wrong = (np.exp(log_qy).mean(0) * (f.mean(0) - log_qy.mean(0))).sum(-1)
    assert np.abs(wrong - minus_U).max() > 1e-3


def test_one_hot_classifier_makes_the_unlabeled_bound_the_labeled_one():
    """q(y|a,x) = 1 for y = c: −U(x) = −L(x,c) (the entropy and the other classes vanish)."""
    S, B, c = 2, 4, 1
    for cls in (adgm.ADGM, adgm.SDGM, adgm.M2):
        model = tiny(cls)
        model.qy_logits.weight[0].data[...] = 0
        model.qy_logits.bias.data[...] = np.where(np.arange(K) == c, 1e4, 0.0)
        x = ad.Tensor(batch(B_u=B)[2])
        noise = fixed_noise(B, B, S)
        model.noise = adgm.Noise({"a_u": noise["a_u"], "z_u": noise["z_u"],
                                  "a_l": noise["a_u"], "z_l": noise["z_u"][:, :, c:c + 1]})
        minus_U, qy, _, _ = model.unlabeled_bound(x, S)
        minus_L = model.labeled_bound(x, np.full(B, c), S)[0].data
        assert (qy.data[..., c] == 1).all()
        np.testing.assert_allclose(minus_U.data, minus_L, rtol=1e-12)
        assert np.isfinite(minus_U.data).all()


@pytest.mark.parametrize("dtype, gap", [("float64", 1e4), ("float32", 1e4), ("float32", 120.0)])
def test_logged_stats_stay_finite_with_a_confident_classifier(dtype, gap):
    """A trained classifier is confident: q(y|a,x) of the other classes underflows to 0 (below
    e^-104 in float32). The loss and every logged term must stay finite, the entropy ≈ 0."""
    S, c = 2, 1
    model = tiny(adgm.ADGM, dtype=dtype)
    model.qy_logits.weight[0].data[...] = 0
    model.qy_logits.bias.data[...] = np.where(np.arange(K) == c, gap, 0.0).astype(dtype)
    x_l, y_l, x_u = batch(dtype=dtype)
    with np.errstate(all="ignore"):
        J, stats = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, S)
    assert np.isfinite(J.data)
    bad = {k: float(v) for k, v in stats.items() if not np.isfinite(v)}
    assert not bad, f"non-finite stats: {bad}"
    assert abs(float(stats["entropy_qy"])) < 1e-6


# ---------------------------------------------------------------------------------------------
# The bounds against plain-NumPy formulas, every factor written out again
# ---------------------------------------------------------------------------------------------

def np_mlp(net, *inputs):
    """autodiff.MLP without batch norm: ReLU(Σ_i x_i W_i + b), then ReLU(h W + b) per layer."""
    first = net.layers[0]
    h = np.maximum(sum(x @ w.data for x, w in zip(inputs, first.weight)) + first.bias.data, 0)
    for layer in net.layers[1:]:
        h = np.maximum(h @ layer.weight[0].data + layer.bias.data, 0)
    return h


def np_affine(layer, h):
    return h @ layer.weight[0].data + layer.bias.data


def np_gaussian(g, *inputs):
    """μ, log σ² of an autodiff.Gaussian."""
    h = np_mlp(g.net, *inputs)
    return np_affine(g.head.mu, h), np_affine(g.head.logvar, h)


def np_log_normal(v, mu, logvar):
    return np.sum(-0.5 * (np.log(2 * np.pi) + logvar + (v - mu) ** 2 / np.exp(logvar)), axis=-1)


def np_log_px(model, x, h):
    if model.likelihood == "bernoulli":
        logits = np_affine(model.px_out, h)
        return np.sum(x * logits - np.logaddexp(0, logits), axis=-1)
    return np_log_normal(x, np_affine(model.px_out.mu, h), np_affine(model.px_out.logvar, h))


@pytest.mark.parametrize("cls, kw", [c[1:] for c in LOOP], ids=[c[0] for c in LOOP])
def test_labeled_bound_equals_an_independent_numpy_formula(cls, kw):
    """−L(x,y) (Eq. 10) and the classifier term, one sample, temperature T, in plain NumPy:
    log p(x|·) + log p(y) + T·(log p(z) + log p(a|·) − log q(a|x) − log q(z|·))."""
    B, T = 4, 0.7
    model = tiny(cls, **kw)
    x, y, _ = batch(B_l=B, binary=kw.get("likelihood") != "gaussian")
    gen = np.random.default_rng(7)
    eps_a, eps_z = gen.standard_normal((1, B, A)), gen.standard_normal((1, B, 1, Z))
    model.noise = adgm.Noise({"a_l": eps_a, "z_l": eps_z})
    minus_L, log_qy_l, _, _ = model.labeled_bound(ad.Tensor(x), y, 1, T)

    y1 = np.eye(K)[y]
    kl = 0.0
    if cls is adgm.M2:
        a_in = ()
    else:
        mu_a, lv_a = np_gaussian(model.qa_x, x)                                      # q(a|x)
        a = mu_a + np.exp(0.5 * lv_a) * eps_a[0] if cls is not adgm.ADGMDeterministic else mu_a
        a_in = (a,)
    mu_z, lv_z = np_gaussian(model.qz_axy, x, *a_in, y1)                             # q(z|a,y,x)
    z = mu_z + np.exp(0.5 * lv_z) * eps_z[0, :, 0]
    kl += np_log_normal(z, mu_z, lv_z) - np_log_normal(z, 0, 0)                      # log q(z|·) − log p(z)
    if cls in (adgm.ADGM, adgm.SDGM):
        mu_pa, lv_pa = np_gaussian(model.pa_zy, z, y1, *((x,) if kw.get("x_in_pa") else ()))  # p(a|z,y[,x])
        kl += np_log_normal(a, mu_a, lv_a) - np_log_normal(a, mu_pa, lv_pa)
    h = np_mlp(model.px_net, z, y1, *(a_in if cls is adgm.SDGM else ()))             # p(x|[a,]y,z)
    expected = np_log_px(model, x, h) - np.log(K) - T * kl
    np.testing.assert_allclose(minus_L.data, expected, rtol=1e-12)

    logits = np_affine(model.qy_logits, np_mlp(model.qy_ax, x, *a_in))              # q(y|a,x)
    log_qy = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(log_qy_l.data, log_qy[np.arange(B), y], rtol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_auxiliary_vae_log_weights_equal_an_independent_numpy_formula(layers):
    """log p(x,a,z) − log q(a,z|x) of Eq. 19-20 written out in NumPy for L = 1 and L = 2."""
    S, B, T = 2, 4, 0.7
    ad.rng.reseed(0)
    model = perturb(adgm.AuxiliaryVAE(D, layers, H, A, Z, dtype="float64"))
    x = batch(B_u=B)[2]
    gen = np.random.default_rng(5)
    eps = {f"{v}{i}": gen.standard_normal((S, B, A if v == "a" else Z)) for i in range(layers) for v in "az"}
    model.noise = adgm.Noise(eps)
    f = model.log_weights(ad.Tensor(x), S, T).data

    def draw(g, name, *inputs):
        mu, lv = np_gaussian(g, *inputs)
        v = mu + np.exp(0.5 * lv) * eps[name]
        return v, np_log_normal(v, mu, lv)
    a1, q_a1 = draw(model.qa[0], "a0", x)                                            # q(a_1|x)
    z1, q_z1 = draw(model.qz[0], "z0", a1, x)                                        # q(z_1|a_1,x)
    log_q = q_a1 + q_z1
    if layers == 1:
        log_p = np_log_normal(z1, 0, 0) + np_log_normal(a1, *np_gaussian(model.pa[0], z1))  # p(z_1) p(a_1|z_1)
    else:
        a2, q_a2 = draw(model.qa[1], "a1", a1, x)                                    # q(a_2|a_1,x)
        z2, q_z2 = draw(model.qz[1], "z1", a2, z1)                                   # q(z_2|a_2,z_1)
        log_q = log_q + q_a2 + q_z2
        log_p = (np_log_normal(z2, 0, 0) + np_log_normal(a2, *np_gaussian(model.pa[1], z2))   # p(z_2) p(a_2|z_2)
                 + np_log_normal(z1, *np_gaussian(model.pz[0], z2))                           # p(z_1|z_2)
                 + np_log_normal(a1, *np_gaussian(model.pa[0], z1, z2)))                      # p(a_1|z_1,z_2)
    expected = np_log_px(model, x, np_mlp(model.px_net, z1)) + T * (log_p - log_q)  # p(x|z_1)
    np.testing.assert_allclose(f, expected, rtol=1e-12)


def test_potential_model_log_weights_equal_an_independent_numpy_formula():
    """Eq. 18: −U(z) + log p(a|z) − log q(a) − log q(z|a), q(a) = N(μ, σ²) with no input."""
    S = 6
    U, _ = gaussian_energy()
    ad.rng.reseed(0)
    model = perturb(adgm.PotentialModel(U, hidden=(6,), a_dim=A, dtype="float64"), scale=0.2)
    gen = np.random.default_rng(5)
    eps_a, eps_z = gen.standard_normal((S, A)), gen.standard_normal((S, 2))
    model.noise = adgm.Noise({"q": eps_a, "z": eps_z})
    f, z_model = (t.data for t in model.log_weights(S))
    mu, lv = model.mu.data, model.logvar.data
    a = mu + np.exp(0.5 * lv) * eps_a                                                 # q(a)
    mu_z, lv_z = np_gaussian(model.qz_a, a)
    z = mu_z + np.exp(0.5 * lv_z) * eps_z                                             # q(z|a)
    expected = (-U(z[:, 0], z[:, 1], np) + np_log_normal(a, *np_gaussian(model.pa_z, z))
                - np_log_normal(a, mu, lv) - np_log_normal(z, mu_z, lv_z))
    np.testing.assert_allclose(f, expected, rtol=1e-12)
    np.testing.assert_allclose(z_model, z, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The split first layer
# ---------------------------------------------------------------------------------------------

def test_split_first_layer_equals_one_matmul_on_the_concatenated_input():
    """Σ_i x_i W_i + b with x (B,1,D), a (S,B,1,A), y (1,K,K) broadcast to (S,B,K,H), against
    [x; a; y] tiled to (S,B,K,D+A+K) times [W_x; W_a; W_y]; forward and every gradient."""
    S, B, n_out = 2, 3, 4
    ad.rng.reseed(0)
    layer = perturb(ad.Linear((D, A, K), n_out, dtype="float64"))
    gen = np.random.default_rng(4)
    x, a, y = gen.standard_normal((B, 1, D)), gen.standard_normal((S, B, 1, A)), np.eye(K)[None]
    inputs = [ad.Tensor(v, requires_grad=True) for v in (x, a, y)]
    for activation in (None, "relu"):
        for t in inputs + list(layer.parameters().values()):
            t.grad = None
        out = layer(*inputs, activation=activation)
        lead = (S, B, K)
        cat = np.concatenate([np.broadcast_to(v, lead + v.shape[-1:]) for v in (x, a, y)], axis=-1)
        W = np.concatenate([w.data for w in layer.weight], axis=0)                   # (D+A+K, H)
        pre = cat @ W + layer.bias.data                                              # (S, B, K, H)
        expected = pre if activation is None else np.maximum(pre, 0)
        assert out.shape == lead + (n_out,)
        np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-14)
        G = gen.standard_normal(out.shape)                                           # d(Σ out·G)/d·
        (out * ad.Tensor(G)).sum().backward()
        G = G if activation is None else G * (pre > 0)
        gW = cat.reshape(-1, cat.shape[-1]).T @ G.reshape(-1, n_out)
        ends = np.cumsum([D, A])
        for w, g in zip(layer.weight, np.split(gW, ends, axis=0)):
            np.testing.assert_allclose(w.grad, g, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.bias.grad, G.reshape(-1, n_out).sum(0), rtol=1e-12)
        g_cat = G @ W.T                                                              # (S, B, K, D+A+K)
        for t, g in zip(inputs, np.split(g_cat, ends, axis=-1)):
            axes = tuple(i for i in range(4) if i < 4 - t.ndim or t.shape[i - (4 - t.ndim)] == 1)
            np.testing.assert_allclose(t.grad, g.sum(axis=axes).reshape(t.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls, kw", [(adgm.ADGM, {"x_in_pa": True}), (adgm.SDGM, {}), (adgm.M2, {})])
def test_model_with_split_layers_equals_the_plain_concatenated_model(cls, kw, monkeypatch):
    """The whole J and its gradients agree when every multi-input layer is instead the plain
    W [x; a; y] + b on its broadcast, concatenated inputs (bench.concatenated_first_layers)."""
    from tools import bench  # imports train.py; only this test needs it
    model = tiny(cls, **kw)
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 2))
    params = model.parameters()
    n_inputs, linear = [], ad.linear

    def counted(inputs, *args, **kwargs):  # how many inputs each fused layer was given
        n_inputs.append(len(inputs))
        return linear(inputs, *args, **kwargs)
    monkeypatch.setattr(ad, "linear", counted)

    def J_and_gradients():
        n_inputs.clear()
        for p in params.values():
            p.grad = None
        J = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)[0]
        J.backward()
        return float(J.data), {n: p.grad.copy() for n, p in params.items()}, max(n_inputs)
    J1, g1, widest_split = J_and_gradients()
    with bench.concatenated_first_layers():
        J2, g2, widest_concatenated = J_and_gradients()
    assert widest_split > 1 and widest_concatenated == 1  # x, a, y apart; then one product per layer
    np.testing.assert_allclose(J1, J2, rtol=1e-12)
    for name in g1:
        np.testing.assert_allclose(g1[name], g2[name], rtol=1e-9, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Bounds against a known log Z; the importance-weighted bound
# ---------------------------------------------------------------------------------------------

class PooledNoise:
    """ε for PotentialModel from one pre-drawn pool, handed out in consecutive blocks per name, so
    that every K sees the same draws (common random numbers: the K-sample estimates are nested
    groups of one sample, and their differences are not drowned in Monte-Carlo noise)."""

    def __init__(self, n, a_dim, seed=0):
        gen = np.random.default_rng(seed)
        self.pool = {"q": gen.standard_normal((n, a_dim)), "z": gen.standard_normal((n, 2))}
        self.used = {"q": 0, "z": 0}

    def __call__(self, name, shape, dtype):
        start = self.used[name]
        self.used[name] += shape[0]
        eps = self.pool[name][start:start + shape[0]]
        assert eps.shape == tuple(shape), "the pool is used up"
        return eps


def test_bound_below_a_known_log_z_and_the_iw_bound_rises_toward_it(seed=0, steps=60):
    """A Gaussian target exp(−U), log Z = log(2π s1 s2): the bound (Eq. 18) is below log Z and the
    importance-weighted bound climbs toward it as K = 1, 10, 100, 1000."""
    U, log_z = gaussian_energy()
    ad.rng.reseed(seed)
    model = adgm.PotentialModel(U, dtype="float64")                   # the paper's networks
    opt = ad.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):  # briefly: untrained, log p/q has tails to −10⁴ and below (Glorot heads)
        opt.zero_grad()
        model.loss(64)[0].backward()
        opt.step()
    N = 20000
    model.noise = PooledNoise(N, 4, seed)
    elbo = -float(model.loss(N)[0].data)                              # the bound, N samples
    iw = {}
    for k in (1, 10, 100, 1000):
        model.noise = PooledNoise(N, 4, seed)                         # the same draws for each K
        iw[k] = np.mean([float(model.log_z(k)) for _ in range(N // k if k > 1 else 1000)])
    model.noise = PooledNoise(N, 4, seed)
    assert iw[1] == pytest.approx(-float(model.loss(1000)[0].data), rel=1e-12)  # K = 1: the bound
    assert abs(iw[1] - elbo) < 0.1                                    # (1000 of the N draws)
    gaps = [log_z - elbo] + [log_z - iw[k] for k in (10, 100, 1000)]  # K = 1, 10, 100, 1000
    print(f"\nlog Z {log_z:.4f}, ELBO {elbo:.4f}, IW bounds {iw}, gaps {np.round(gaps, 4)}")
    assert gaps[0] > 0.03                                             # the bound is below log Z
    assert all(g1 > g2 for g1, g2 in zip(gaps, gaps[1:])), gaps       # the gap shrinks with K
    assert gaps[0] - gaps[1] > 0.02 and gaps[-1] < min(0.1, gaps[0] / 3), gaps  # ... a good part of it
    assert gaps[-1] > -0.02, gaps                                     # not above log Z (MC error)


def test_iw_log_likelihood_rises_with_k_and_is_above_the_unlabeled_bound():
    """log_likelihood(x, K) (y summed out exactly) averaged over examples: increasing in K and
    above the ELBO −U(x); with K = 1 and the same noise it is above −U(x) example by example
    (log Σ_y e^f_y ≥ Σ_y q_y (f_y − log q_y), Gibbs' inequality)."""
    B = 6
    model = tiny(adgm.ADGM)
    x = batch(B_u=B)[2]
    elbo = np.mean([model.unlabeled_bound(ad.Tensor(x), 50)[0].data.mean() for _ in range(20)])
    repeats = {1: 400, 10: 40, 100: 8}
    iw = {k: np.mean([model.log_likelihood(x, k, chunk=50).mean() for _ in range(n)]) for k, n in repeats.items()}
    print(f"\nELBO {elbo:.4f}, IW bounds {iw}")
    assert elbo < iw[1] < iw[10] < iw[100]

    noise = fixed_noise(B, B, 1)
    model.noise = adgm.Noise({"a_u": noise["a_u"], "z_u": noise["z_u"]})
    minus_U, qy, _, _ = model.unlabeled_bound(ad.Tensor(x), 1)
    ll = model.log_likelihood(x, 1)
    assert (ll >= minus_U.data - 1e-12).all()
    assert (ll - minus_U.data).max() > 1e-6  # q(y|a,x) is not yet the posterior


def test_auxiliary_vae_iw_bound_is_above_its_elbo():
    """The bound of Eq. 2 (2000 samples) < the IW bound with K = 10 < with K = 300 (Sec. 4.3)."""
    x = batch(B_u=4)[2]
    for layers in (1, 2):
        ad.rng.reseed(0)
        model = perturb(adgm.AuxiliaryVAE(D, layers, H, A, Z, dtype="float64"))
        elbo = -float(model.loss(ad.Tensor(x), samples=2000)[0].data)
        iw = {k: np.mean([model.log_likelihood(x, k).mean() for _ in range(n)]) for k, n in ((10, 30), (300, 3))}
        assert elbo < iw[10] < iw[300], (layers, elbo, iw)


# ---------------------------------------------------------------------------------------------
# The deterministic-a ablation and M2
# ---------------------------------------------------------------------------------------------

def test_deterministic_a_has_no_a_terms():
    model = tiny(adgm.ADGMDeterministic)
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 2))
    args = (ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)
    J, stats = model.loss(*args)
    J.backward()
    assert model.pa_zy is None
    for terms in (model.unlabeled_bound(ad.Tensor(x_u), 2)[2], model.labeled_bound(ad.Tensor(x_l), y_l, 2)[2]):
        assert {"log_qz_axy", "log_pz", "log_py", "log_px"} <= set(terms)
        assert not [name for name in terms if "pa" in name or "qa" in name], terms
    assert float(stats["kl_a"]) == 0
    logvar = model.qa_x.head.logvar
    assert logvar.weight[0].grad is None and logvar.bias.grad is None                 # no path to J
    logvar.weight[0].data[...] += 3.0                                                 # σ of q(a|x) plays
    logvar.bias.data[...] -= 2.0                                                      # no part: a = μ
    np.testing.assert_array_equal(model.loss(*args)[0].data, J.data)

    # The same change does move the stochastic model's J (so the check above can fail).
    stochastic = tiny(adgm.ADGM)
    stochastic.noise = model.noise
    before = stochastic.loss(*args)[0].data
    stochastic.qa_x.head.logvar.weight[0].data[...] += 3.0
    assert abs(stochastic.loss(*args)[0].data - before) > 1e-3


@pytest.mark.parametrize("cls", [adgm.ADGM, adgm.SDGM, adgm.M2, authors.ADGMAuthors], ids=lambda c: c.__name__)
def test_batchnorm_running_averages_follow_the_unlabeled_half(cls):
    """After a training step the running averages of every BatchNorm layer are what the unlabeled
    half alone gives them, whatever the labeled half: evaluation sums over every class, as the
    unlabeled bound does, and the labeled half's true class would give other statistics."""
    def averages(model):
        return [np.array(t.data) for name, t in model.named_tensors() if "running" in name]
    x_l, y_l, x_u = batch()
    fresh = averages(tiny(cls, batchnorm=True))
    after = []
    for labeled in [(x_l, y_l), (1 - x_l[::-1], (y_l + 1) % K)]:
        model = tiny(cls, batchnorm=True)
        model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 2))
        model.loss(ad.Tensor(labeled[0]), labeled[1], ad.Tensor(x_u), 2.5, 2)
        after.append(averages(model))
    model = tiny(cls, batchnorm=True)
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 2))
    model.unlabeled_bound(ad.Tensor(x_u), 2)
    alone = averages(model)
    assert len(alone) >= 6 and all(np.abs(a - f).max() > 1e-3 for a, f in zip(alone, fresh))  # all were updated
    for averaged in after:
        for a, b in zip(averaged, alone):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_m2_has_no_auxiliary_variable():
    m2 = tiny(adgm.M2)
    assert m2.qa_x is None and m2.pa_zy is None
    assert not [name for name in m2.parameters() if "qa_x" in name or "pa_zy" in name]
    assert tiny(adgm.ADGM).qa_x is not None
    x_l, y_l, x_u = batch()
    m2.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 2))
    _, stats = m2.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)
    assert float(stats["kl_a"]) == 0
    terms = m2.unlabeled_bound(ad.Tensor(x_u), 2)[2]
    assert {"log_qz_axy", "log_pz", "log_py", "log_px"} <= set(terms)
    assert not [name for name in terms if "pa" in name or "qa" in name], terms


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes of every output
# ---------------------------------------------------------------------------------------------

SHAPES = [(name, m.cls, {}) for name, m in kinds.MODELS.items() if m.kind == "semi-supervised"] + [
    ("adgm-x_in_pa-gaussian", adgm.ADGM, {"x_in_pa": True, "likelihood": "gaussian"}),
    ("sdgm-batchnorm", adgm.SDGM, {"batchnorm": True})]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cls, kw", [c[1:] for c in SHAPES], ids=[c[0] for c in SHAPES])
def test_shapes_and_dtypes_of_every_output(cls, kw, dtype):
    model = tiny(cls, dtype=dtype, **kw)
    bernoulli = kw.get("likelihood", "bernoulli") == "bernoulli"
    x_l, y_l, x_u = batch(binary=bernoulli, dtype=dtype)
    B, has_a, stochastic = len(x_u), cls is not adgm.M2, cls in (adgm.ADGM, adgm.SDGM)
    J, stats = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)
    assert isinstance(J, ad.Tensor) and J.shape == () and J.dtype == dtype
    assert set(stats) >= {"loss", "bound_labeled", "bound_unlabeled", "log_px", "kl_z", "kl_a"}
    for name, value in stats.items():
        assert np.shape(value) == () and value.dtype == dtype, (name, value)
    J.backward()
    for name, p in model.parameters().items():
        assert p.dtype == dtype and (p.grad is None or (p.grad.dtype == dtype and p.grad.shape == p.shape)), name

    model.eval()
    for labels in (model.predict(x_u, 3), model.predict_bayes(x_u, 3)) + model.evaluate(x_u, 3)[:2]:
        assert labels.shape == (B,) and labels.dtype.kind == "i" and 0 <= labels.min() and labels.max() < K
    minus_U = model.evaluate(x_u, 3)[2]
    assert minus_U.shape == (B,) and minus_U.dtype == dtype
    ll = model.log_likelihood(x_u, iw_samples=5, chunk=2)
    assert ll.shape == (B,) and ll.dtype == dtype and np.isfinite(ll).all()
    a, z = model.encode(x_u)
    assert z.shape == (B, Z) and z.dtype == dtype
    assert (a is None) == (not has_a) and (a is None or (a.shape == (B, A) and a.dtype == dtype))
    x = model.generate(np.arange(7) % K, ad.rng.normal((7, Z), dtype))
    assert x.shape == (7, D) and x.dtype == dtype
    if bernoulli:
        assert x.min() >= 0 and x.max() <= 1
    kl_a, kl_z = model.kl_per_unit(x_u, samples=2)
    assert kl_z.shape == (Z,) and kl_z.dtype == dtype and (kl_z >= 0).all()
    assert (kl_a is None) == (not stochastic)
    if stochastic:
        assert kl_a.shape == (A,) and kl_a.dtype == dtype and np.isfinite(kl_a).all()


def test_predict_averages_q_y_over_the_samples_of_a():
    """predict: argmax_y of q(y|a,x) averaged over the samples a_s = μ + σ·ε_s of q(a|x), here with
    the noise ε fixed and wide enough that the samples disagree."""
    model, S, B = tiny(adgm.ADGM), 5, 40
    x = np.random.default_rng(4).random((B, D))
    eps = 3 * np.random.default_rng(5).standard_normal((S, B, A))
    model.noise = adgm.Noise({"a_u": eps})
    with ad.no_grad():
        mu, logvar = (t.data for t in model.qa_x(ad.Tensor(x)))
        qy = [np.exp(model.log_qy(ad.Tensor(x), ad.Tensor((mu + np.exp(0.5 * logvar) * e)[None])).data[0]) for e in eps]
    averaged = np.mean(qy, axis=0).argmax(axis=-1)
    assert (averaged != qy[0].argmax(axis=-1)).any()  # the first sample alone would say otherwise
    np.testing.assert_array_equal(model.predict(x, samples=S), averaged)


def constant_gaussian(gaussian, mu, logvar):
    """Make an ad.Gaussian give N(mu, exp(logvar)) whatever its inputs: zero head weights."""
    for head, bias in ((gaussian.head.mu, mu), (gaussian.head.logvar, logvar)):
        for w in head.weight:
            w.data[...] = 0
        head.bias.data[...] = bias


def test_the_log_density_of_each_unit_sums_to_the_gaussian_log_density():
    gen = np.random.default_rng(6)
    x, mu, logvar = (ad.Tensor(gen.standard_normal((3, 4, 5))) for _ in range(3))
    np.testing.assert_allclose(adgm.log_normal_units(x, mu, logvar).sum(axis=-1).data,
                               adgm.log_normal(x, mu, logvar).data, rtol=1e-13)


def test_the_kl_of_each_unit_is_the_closed_form_for_z_and_zero_where_q_and_p_of_a_agree():
    """Fig. 4a's measure: with q(z|a,y,x) = N(b, s²) whatever its inputs, the KL of unit i of z is
    ½(b_i² + s_i² − 1 − log s_i²); where q(a|x) and p(a|z,y) are one and the same Gaussian, the KL of
    every unit of a is 0."""
    model = tiny(adgm.ADGM)
    b, log_s2 = np.array([0.5, -1.0]), np.array([0.3, -0.2])
    constant_gaussian(model.qz_axy, b, log_s2)
    for gaussian in (model.qa_x, model.pa_zy):
        constant_gaussian(gaussian, np.array([0.2, -0.1]), np.array([-0.5, 0.4]))
    kl_a, kl_z = model.kl_per_unit(batch()[2], samples=3)
    np.testing.assert_allclose(kl_z, 0.5 * (b ** 2 + np.exp(log_s2) - 1 - log_s2), rtol=1e-12)
    np.testing.assert_allclose(kl_a, 0, atol=1e-12)


def test_encode_gives_the_mean_of_q_a_and_of_q_z_at_that_a_and_the_predicted_class():
    model, x = tiny(adgm.ADGM), batch()[2]
    constant_gaussian(model.qa_x, np.array([0.3, -0.4]), np.array([1.0, 2.0]))
    a, z = model.encode(x)
    np.testing.assert_allclose(a, np.tile([0.3, -0.4], (len(x), 1)))
    with ad.no_grad():
        y = model.log_qy(ad.Tensor(x), ad.Tensor(a[None])).data[0].argmax(axis=-1)
        expected = model.qz_axy(ad.Tensor(x), ad.Tensor(a), ad.Tensor(model.classes[y]))[0].data
    np.testing.assert_allclose(z, expected)


class CountingNoise(adgm.Noise):
    """The backend's noise, with the number of samples drawn under each name counted."""

    def __init__(self):
        super().__init__()
        self.drawn = {}

    def __call__(self, name, shape, dtype):
        self.drawn[name] = self.drawn.get(name, 0) + shape[0]
        return super().__call__(name, shape, dtype)


def test_the_importance_weighted_bound_draws_its_samples_exactly_whatever_the_chunk():
    """iw_samples = 7 in chunks of 3: 3 + 3 + 1 samples of every variable, not 3 + 3 + 3."""
    for model in (tiny(adgm.ADGM), adgm.AuxiliaryVAE(D, 2, H, A, Z, dtype="float64")):
        model.noise = CountingNoise()
        model.log_likelihood(batch()[2], iw_samples=7, chunk=3)
        assert model.noise.drawn and set(model.noise.drawn.values()) == {7}, model.noise.drawn


def test_sdgm_with_x_in_pa_is_refused_or_can_generate():
    """train.py accepts --model sdgm --x-in-pa. Either the model refuses the combination (p(a|z,y,x)
    with p(x|a,y,z) is a cycle, not a generative model) or everything it offers works, generate
    (which draws a from p(a|z,y) first) included."""
    try:
        model = tiny(adgm.SDGM, x_in_pa=True)
    except (ValueError, AssertionError):
        return
    x = model.generate(np.arange(4) % K, ad.rng.normal((4, Z), "float64"))
    assert x.shape == (4, D)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shapes_and_dtypes_of_the_auxiliary_vae_and_the_potential_model(dtype):
    x = batch(B_u=4, dtype=dtype)[2]
    for layers in (1, 2):
        ad.rng.reseed(0)
        model = adgm.AuxiliaryVAE(D, layers, H, A, Z, dtype=dtype)
        loss, stats = model.loss(ad.Tensor(x), samples=3)
        assert loss.shape == () and loss.dtype == dtype
        assert all(np.shape(v) == () and v.dtype == dtype for v in stats.values())
        f = model.log_weights(ad.Tensor(x), samples=3)
        assert f.shape == (3, 4) and f.dtype == dtype
        ll = model.log_likelihood(x, iw_samples=7, chunk=3)
        assert ll.shape == (4,) and ll.dtype == dtype
        g = model.generate(ad.rng.normal((5, Z), dtype))
        assert g.shape == (5, D) and g.dtype == dtype and g.min() >= 0 and g.max() <= 1
    U, _ = gaussian_energy()
    model = adgm.PotentialModel(U, hidden=(6,), dtype=dtype)
    loss, stats = model.loss(10)
    assert loss.shape == () and loss.dtype == dtype and stats["bound"].dtype == dtype
    assert model.log_z(20).shape == () and model.log_z(20).dtype == dtype
    assert model.sample(9).shape == (9, 2) and model.sample(9).dtype == dtype


# ---------------------------------------------------------------------------------------------
# A sanity run
# ---------------------------------------------------------------------------------------------

def test_adgm_learns_two_separated_blobs_from_four_labels():
    """Two Gaussian blobs in 4-D, 2 labels per class, Gaussian p(x|y,z): 150 Adam steps suffice."""
    gen = np.random.default_rng(0)
    y = np.arange(600) % 2
    x = (gen.standard_normal((600, 4)) + 3.0 * (2 * y[:, None] - 1)).astype("float32")
    test = slice(400, 600)  # the first 400 are the training set, the unlabeled examples drawn from them
    ad.rng.reseed(0)
    model = adgm.ADGM(4, 2, (16,), 2, 2, likelihood="gaussian")
    opt = ad.Adam(model.parameters(), lr=3e-3)
    labeled = np.array([0, 1, 2, 3])
    for _ in range(150):
        u = gen.choice(400, 50, replace=False)
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x[labeled]), y[labeled], ad.Tensor(x[u]), alpha=10.0)
        J.backward()
        opt.step()
    model.eval()
    error = (model.predict(x[test]) != y[test]).mean()
    bayes_error = (model.predict_bayes(x[test]) != y[test]).mean()
    print(f"\ntest error {error:.3f}, Bayes classifier {bayes_error:.3f}")
    assert error < 0.1
    assert bayes_error < 0.4


@pytest.mark.parametrize("cls", [adgm.ADGM, adgm.SDGM])
def test_the_temperature_on_a_weighs_the_a_terms_alone(cls):
    """f = log p(x|·) + log p(y) − T·(KL_z + T_a·KL_a): with fixed noise J is linear in T_a, and
    J(T_a = 0) − J(T_a = 1) is T times the a-terms log q(a|x) − log p(a|·) of both halves, each
    averaged as in J (the unlabeled one under q(y|a,x)); T_a = 1 is the bound itself."""
    S, T, alpha = 2, 0.7, 2.5
    model = tiny(cls)
    x_l, y_l, x_u = batch()
    args = (ad.Tensor(x_l), y_l, ad.Tensor(x_u), alpha, S, T)
    def J(t_a):
        model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
        return float(model.loss(*args, t_a)[0].data)
    J0, J03, J1 = J(0.0), J(0.3), J(1.0)
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
    assert J1 == float(model.loss(*args)[0].data)
    np.testing.assert_allclose(J03, J0 + 0.3 * (J1 - J0), rtol=1e-12)
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
    _, _, t_l, kl_l = model.labeled_bound(args[0], y_l, S, T)
    _, qy, t_u, kl_u = model.unlabeled_bound(args[2], S, T)
    kl_a_l = (kl_l.data - (t_l["log_qz_axy"].data - t_l["log_pz"].data)).mean()
    kl_a_u = (qy.data * (kl_u.data - (t_u["log_qz_axy"].data - t_u["log_pz"].data))).sum(-1).mean()
    assert abs(kl_a_l) > 1e-3 and abs(kl_a_u) > 1e-3
    np.testing.assert_allclose(J1 - J0, T * (kl_a_l + kl_a_u), rtol=1e-10)
