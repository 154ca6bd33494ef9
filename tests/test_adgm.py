"""The models and bounds of adgm.py: gradients of J, the sum over y, the split first layer,
bounds against a known log Z, and the shapes and dtypes of every output."""
import math

import numpy as np
import pytest

import adgm
import autodiff as ad

D, K, A, Z, H = 5, 3, 2, 2, (6,)


def tiny(cls, dtype="float64", seed=0, **kw):
    """A small model at a generic point (no ReLU at its kink, no near-zero heads)."""
    ad.rng.reseed(seed)
    model = cls(D, K, H, A, Z, dtype=dtype, **kw)
    gen = np.random.default_rng(seed + 1)
    for p in model.parameters().values():
        p.data += (0.3 * gen.standard_normal(p.shape)).astype(dtype)
    return model


def fixed_noise(B_l, B_u, S, seed=2):
    gen = np.random.default_rng(seed)
    return {"a_l": gen.standard_normal((S, B_l, A)), "z_l": gen.standard_normal((S, B_l, 1, Z)),
            "a_u": gen.standard_normal((S, B_u, A)), "z_u": gen.standard_normal((S, B_u, K, Z))}


def batch(B_l=3, B_u=4, seed=3, binary=True):
    gen = np.random.default_rng(seed)
    x_l, x_u = gen.random((B_l, D)), gen.random((B_u, D))
    if binary:
        x_l, x_u = (x_l < 0.5) * 1.0, (x_u < 0.5) * 1.0
    return x_l, np.arange(B_l) % K, x_u


CASES = [(adgm.ADGM, {}), (adgm.SDGM, {}), (adgm.ADGM, {"x_in_pa": True}), (adgm.SDGM, {"likelihood": "gaussian"}),
         (adgm.M2, {}), (adgm.ADGMDeterministic, {}), (adgm.ADGM, {"batchnorm": True})]


@pytest.mark.parametrize("cls, kw", CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_gradient_of_the_objective(cls, kw):
    """dJ/dθ of every parameter against central differences (3 coordinates each), float64."""
    S = 2
    model = tiny(cls, **kw)
    x_l, y_l, x_u = batch(binary=kw.get("likelihood") != "gaussian")
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), S))
    args = (ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, S, 0.7)
    J, _ = model.loss(*args)
    J.backward()
    gen, worst = np.random.default_rng(0), 0.0
    for name, p in model.parameters().items():
        flat = p.data.reshape(-1)
        for i in gen.choice(flat.size, size=min(3, flat.size), replace=False):
            keep = flat[i]
            flat[i] = keep + 1e-6
            up = float(model.loss(*args)[0].data)
            flat[i] = keep - 1e-6
            down = float(model.loss(*args)[0].data)
            flat[i] = keep
            exact = 0.0 if p.grad is None else p.grad.reshape(-1)[i]  # unused: the logvar of a = f(x)
            numeric = (up - down) / 2e-6
            worst = max(worst, abs(numeric - exact) / max(1.0, abs(exact)))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("cls", [adgm.ADGM, adgm.SDGM, adgm.M2])
@pytest.mark.parametrize("S", [1, 3])
def test_enumerated_unlabeled_bound_equals_a_loop_over_classes(cls, S):
    """−U(x) = mean_s Σ_y q(y|a_s,x)(−L_s(x,y) − log q(y|a_s,x)), with −L_s(x,y) from the labeled
    bound of each class and sample separately (same a and z noise)."""
    model = tiny(cls)
    _, _, x = batch(B_u=4)
    noise = fixed_noise(4, 4, S)
    model.noise = adgm.Noise({"a_u": noise["a_u"], "z_u": noise["z_u"]})
    minus_U = model.unlabeled_bound(ad.Tensor(x), S)[0].data
    expected = np.zeros(len(x))
    for s in range(S):
        model.noise = adgm.Noise({"a_u": noise["a_u"][s:s + 1]})
        a, _ = model._sample_a(ad.Tensor(x), 1)
        log_qy = model.log_qy(ad.Tensor(x), a).data[0]                               # (B, K)
        for c in range(K):
            model.noise = adgm.Noise({"a_l": noise["a_u"][s:s + 1], "z_l": noise["z_u"][s:s + 1, :, c:c + 1]})
            minus_L = model.labeled_bound(ad.Tensor(x), np.full(len(x), c), 1)[0].data
            expected += np.exp(log_qy[:, c]) * (minus_L - log_qy[:, c]) / S
    np.testing.assert_allclose(minus_U, expected, rtol=1e-12)


@pytest.mark.parametrize("cls", [adgm.ADGM, adgm.SDGM, adgm.M2])
def test_split_first_layer_equals_the_concatenated_layer(cls):
    model = tiny(cls)
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 2))
    split = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)[0].data
    ad.Linear.split = False
    try:
        plain = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)[0].data
    finally:
        ad.Linear.split = True
    np.testing.assert_allclose(split, plain, rtol=1e-12)


def test_bound_below_a_known_log_z_and_the_iw_bound_rises_toward_it():
    """A Gaussian target exp(−U) with log Z = log(2π s1 s2): the bound (Eq. 18) is below log Z
    and the importance-weighted bound climbs toward it as K grows."""
    s1, s2 = 0.5, 1.5

    def U(z1, z2, ops):
        return 0.5 * ((z1 - 1) ** 2 / s1 ** 2 + (z2 + 0.5) ** 2 / s2 ** 2)

    log_z = math.log(2 * math.pi * s1 * s2)
    ad.rng.reseed(0)
    model = adgm.PotentialModel(U, auxiliary=True, hidden=(8,), a_dim=2, dtype="float64")
    opt = ad.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):  # briefly: an untrained q has heavy-tailed weights
        opt.zero_grad()
        model.loss(100)[0].backward()
        opt.step()
    with ad.no_grad():
        elbo = float(model.log_weights(20000)[0].data.mean())
    repeats = {1: 2000, 10: 200, 100: 50, 1000: 20}  # each estimate averaged to a similar precision
    iw = [np.mean([float(model.log_z(k)) for _ in range(n)]) for k, n in repeats.items()]
    assert elbo < log_z - 0.05
    assert abs(iw[0] - elbo) < 0.1                      # K = 1 is the bound itself
    assert iw[0] < iw[1] < iw[2] < iw[3] < log_z + 0.02
    assert log_z - iw[3] < 0.5 * (log_z - elbo)


def test_iw_log_likelihood_is_above_the_bound_on_average():
    model = tiny(adgm.ADGM)
    _, _, x = batch(B_u=6)
    bound = np.mean([model.unlabeled_bound(ad.Tensor(x), 1)[0].data.mean() for _ in range(50)])
    iw = model.log_likelihood(x, iw_samples=200).mean()
    assert iw > bound


def test_one_hot_classifier_makes_the_unlabeled_bound_the_labeled_one():
    model = tiny(adgm.ADGM)
    c = 1
    model.qy_logits.weight[0].data[...] = 0
    model.qy_logits.bias.data[...] = np.where(np.arange(K) == c, 1e4, 0.0)
    _, _, x = batch(B_u=4)
    noise = fixed_noise(4, 4, 2)
    model.noise = adgm.Noise({"a_u": noise["a_u"], "z_u": noise["z_u"],
                              "a_l": noise["a_u"], "z_l": noise["z_u"][:, :, c:c + 1]})
    minus_U = model.unlabeled_bound(ad.Tensor(x), 2)[0].data
    minus_L = model.labeled_bound(ad.Tensor(x), np.full(4, c), 2)[0].data
    np.testing.assert_allclose(minus_U, minus_L, rtol=1e-10)


def test_deterministic_a_has_no_a_terms_and_m2_has_no_a():
    model = tiny(adgm.ADGMDeterministic)
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 1))
    J, stats = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5)
    _, _, terms, _ = model.unlabeled_bound(ad.Tensor(x_u))
    assert "log_pa_zy" not in terms and model.pa_zy is None
    assert float(stats["kl_a"]) == 0
    model.qa_x.head.logvar.weight[0].data[...] += 3.0   # σ of q(a|x) plays no part: a = its mean
    np.testing.assert_allclose(model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5)[0].data, J.data, rtol=1e-12)
    m2 = tiny(adgm.M2)
    assert m2.qa_x is None and m2.pa_zy is None
    assert not [name for name in m2.parameters() if "qa_x" in name or "pa_zy" in name]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cls", list(adgm.MODELS.values()))
def test_shapes_and_dtypes_of_every_output(cls, dtype):
    model = tiny(cls, dtype=dtype)
    x_l, y_l, x_u = (v.astype(dtype) if v.dtype.kind == "f" else v for v in batch())
    J, stats = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)
    assert J.shape == () and J.dtype == dtype
    assert all(np.shape(v) == () and v.dtype == dtype for v in stats.values()), stats
    B = len(x_u)
    pred, bayes, minus_U = model.evaluate(x_u, 3)
    for labels in (pred, bayes, model.predict(x_u, 3), model.predict_bayes(x_u, 3)):
        assert labels.shape == (B,) and labels.dtype.kind == "i" and labels.min() >= 0 and labels.max() < K
    assert minus_U.shape == (B,) and minus_U.dtype == dtype
    ll = model.log_likelihood(x_u, iw_samples=5, chunk=2)
    assert ll.shape == (B,) and ll.dtype == dtype
    a, z = model.encode(x_u)
    assert z.shape == (B, Z) and (a is None) == (cls is adgm.M2) and (a is None or a.shape == (B, A))
    x = model.generate(np.arange(6) % K, ad.rng.normal((6, Z), dtype))
    assert x.shape == (6, D) and x.dtype == dtype and x.min() >= 0 and x.max() <= 1
    kl_a, kl_z = model.kl_per_unit(x_u)
    assert kl_z.shape == (Z,) and (kl_z >= 0).all() and kl_z.dtype == dtype
    assert kl_a is None if cls in (adgm.M2, adgm.ADGMDeterministic) else kl_a.shape == (A,)


@pytest.mark.parametrize("layers", [1, 2])
def test_auxiliary_vae_bounds(layers):
    ad.rng.reseed(0)
    model = adgm.AuxiliaryVAE(D, layers, H, A, Z, dtype="float64")
    _, _, x = batch(B_u=4)
    loss, stats = model.loss(ad.Tensor(x), samples=3)
    assert loss.shape == () and stats["bound"].shape == ()
    f = model.log_weights(ad.Tensor(x), samples=3)
    assert f.shape == (3, 4)
    bound = np.mean([model.log_weights(ad.Tensor(x), 1).data.mean() for _ in range(100)])
    assert model.log_likelihood(x, iw_samples=300).mean() > bound
    assert model.generate(ad.rng.normal((5, Z), "float64")).shape == (5, D)


def test_semi_supervised_model_learns_two_blobs():
    """A sanity run: 2 labels per class on two well-separated blobs is enough."""
    gen = np.random.default_rng(0)
    y = np.arange(400) % 2
    x = (gen.standard_normal((400, 4)) + 3.0 * (2 * y[:, None] - 1)).astype("float32")
    ad.rng.reseed(0)
    model = adgm.ADGM(4, 2, (16,), 2, 2, likelihood="gaussian")
    opt = ad.Adam(model.parameters(), lr=3e-3)
    labeled = np.array([0, 1, 2, 3])
    for step in range(150):
        u = gen.choice(300, 50, replace=False)
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x[labeled]), y[labeled], ad.Tensor(x[u]), alpha=10.0)
        J.backward()
        opt.step()
    assert (model.predict(x[300:]) != y[300:]).mean() < 0.1
    assert (model.predict_bayes(x[300:]) != y[300:]).mean() < 0.5


def _np_mlp(net, *inputs):
    """An independent NumPy forward pass of autodiff.MLP (ReLU after every layer)."""
    first = net.layers[0]
    h = sum(x @ w.data for x, w in zip(inputs, first.weight)) + first.bias.data
    h = np.maximum(h, 0)
    for layer in net.layers[1:]:
        h = np.maximum(h @ layer.weight[0].data + layer.bias.data, 0)
    return h


def _np_gaussian(g, *inputs):
    h = _np_mlp(g.net, *inputs)
    head = g.head
    return (h @ head.mu.weight[0].data + head.mu.bias.data, h @ head.logvar.weight[0].data + head.logvar.bias.data)


def _np_log_normal(v, mu, logvar):
    return np.sum(-0.5 * (np.log(2 * np.pi) + logvar + (v - mu) ** 2 / np.exp(logvar)), axis=-1)


@pytest.mark.parametrize("cls", [adgm.ADGM, adgm.SDGM])
def test_labeled_bound_equals_an_independent_numpy_formula(cls):
    """−L(x,y) (Eq. 10) with every factor written out again in plain NumPy, one sample."""
    model = tiny(cls)
    x, y, _ = batch(B_l=4)
    gen = np.random.default_rng(7)
    eps_a, eps_z = gen.standard_normal((1, 4, A)), gen.standard_normal((1, 4, 1, Z))
    model.noise = adgm.Noise({"a_l": eps_a, "z_l": eps_z})
    minus_L = model.labeled_bound(ad.Tensor(x), y, 1)[0].data

    y1 = np.eye(K)[y]
    mu_a, lv_a = _np_gaussian(model.qa_x, x)                                   # q(a|x)
    a = mu_a + np.exp(0.5 * lv_a) * eps_a[0]
    mu_z, lv_z = _np_gaussian(model.qz_axy, x, a, y1)                          # q(z|a,y,x)
    z = mu_z + np.exp(0.5 * lv_z) * eps_z[0, :, 0]
    mu_pa, lv_pa = _np_gaussian(model.pa_zy, z, y1)                            # p(a|z,y)
    h = _np_mlp(model.px_net, *((z, y1, a) if cls is adgm.SDGM else (z, y1)))
    logits = h @ model.px_out.weight[0].data + model.px_out.bias.data          # p(x|[a,]y,z)
    log_px = np.sum(-x * np.logaddexp(0, -logits) - (1 - x) * np.logaddexp(0, logits), axis=-1)
    expected = (log_px + _np_log_normal(a, mu_pa, lv_pa) - np.log(K) + _np_log_normal(z, 0, 0)
                - _np_log_normal(a, mu_a, lv_a) - _np_log_normal(z, mu_z, lv_z))
    np.testing.assert_allclose(minus_L, expected, rtol=1e-12)
