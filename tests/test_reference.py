"""The porting reference (tests/reference.npz) is what the code computes today, it holds every
name tests/reference.py documents with the documented shape, and it is self-consistent: −U(x)
and J assembled by hand from the stored terms, and the gradients by finite differences."""
import numpy as np
import pytest

import adgm
import autodiff as ad
import check_device
import reference

PAPER = [v for v, (model, *_) in reference.VARIANTS.items() if model != "adgm-authors"]
SYMBOLS = {"S": reference.SAMPLES, "B_l": reference.B_L, "B_u": reference.B_U, "K": reference.SIZES["n_classes"],
           "D": reference.SIZES["x_dim"], "A": reference.SIZES["a_dim"], "Z": reference.SIZES["z_dim"],
           "H": reference.SIZES["hidden"][0], "1": 1}


@pytest.fixture(scope="module")
def stored():
    with np.load(reference.PATH, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def of(stored, variant, kind):
    """{name: array} of one variant's entries of one kind ('term', 'param', ...)."""
    prefix = f"{variant}/{kind}/"
    return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}


def test_reference_file_matches_the_code(stored):
    fresh = reference.all_reference_values()
    assert sorted(fresh) == sorted(stored)
    for name, value in fresh.items():
        if value.dtype.kind == "U":
            assert value == stored[name], name
        else:
            np.testing.assert_allclose(value, stored[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_every_documented_name_is_stored_with_its_shape(stored):
    entries = reference.documented()
    assert len(entries) > 30 and {v for variants, *_ in entries for v in variants} == set(reference.VARIANTS)
    for variants, name, shape, _ in entries:
        for variant in variants:
            key = f"{variant}/{name}"
            assert key in stored, f"{key} is documented but not stored"
            expected = tuple(SYMBOLS[s] for s in shape)
            assert stored[key].shape == expected, f"{key}: {stored[key].shape}, documented {shape}"
    for variant in reference.VARIANTS:  # and nothing is stored that the docstring leaves out
        listed = {name for variants, name, _, _ in entries if variant in variants}
        kept = {k.split("/", 1)[1] for k in stored if k.startswith(variant + "/")}
        assert {k for k in kept if not k.startswith(("param/", "grad/"))} == listed, variant
        params, grads = of(stored, variant, "param"), of(stored, variant, "grad")
        frozen = {k for k in params if k.startswith("qa_x.")} if variant == "adgm-authors" else set()
        assert set(grads) == set(params) - frozen and (frozen or variant != "adgm-authors"), variant
        assert all(grads[k].shape == params[k].shape for k in grads)


@pytest.mark.parametrize("variant", PAPER)
def test_the_bounds_and_J_from_the_stored_terms(stored, variant):
    """−L(x,y), −U(x) and J with f = log p(x|·) + log p(y) − T·(log q − log p of z and a)."""
    t, c = of(stored, variant, "term"), of(stored, variant, "config")
    T, K = float(c["temperature"]), int(c["n_classes"])

    def f(half):
        kl = t[f"log_qz_axy_{half}"] - t[f"log_pz_{half}"] + t[f"log_qa_x_{half}"][..., None] - t[f"log_pa_zy_{half}"]
        return t[f"log_px_{half}"] - np.log(K) - T * kl
    np.testing.assert_allclose(f("l").mean(0)[:, 0], t["minus_L"], rtol=1e-12)
    qy = np.exp(t["log_qy_u"])
    np.testing.assert_allclose((qy * (f("u") - t["log_qy_u"])).sum(-1).mean(0), t["minus_U"], rtol=1e-12)
    y_l = of(stored, variant, "input")["y_l"]
    np.testing.assert_allclose(t["log_qy_l"][:, np.arange(len(y_l)), y_l].mean(0), t["log_qy_label"], rtol=1e-12)
    J = (-t["minus_L"] - float(c["alpha"]) * t["log_qy_label"]).mean() + (-t["minus_U"]).mean()
    assert str(c["average"]) == "halves"
    np.testing.assert_allclose(J, t["loss"], rtol=1e-12)


def test_the_authors_bounds_and_J_from_the_stored_terms(stored):
    """The released code's model: closed-form z- and a-terms, −U(x) with q̄(y|x) = mean_s q(y|a_s,x)
    (+1e-8, renormalised), J the mean over all rows."""
    t, c = of(stored, "adgm-authors", "term"), of(stored, "adgm-authors", "config")
    K = int(c["n_classes"])

    def f(half):  # (S, B, C): the closed forms broadcast over the samples of log p(x|y,z)
        kl = t[f"log_qz_xy_{half}"] - t[f"log_pz_{half}"] + t[f"kl_a_{half}"][:, None]
        return t[f"log_px_{half}"] - np.log(K) - float(c["temperature"]) * kl
    np.testing.assert_allclose(f("l").mean(0)[:, 0], t["minus_L"], rtol=1e-12)
    qy = np.exp(t["log_qy_u"]).mean(0) + 1e-8
    qy /= qy.sum(-1, keepdims=True)
    np.testing.assert_allclose((qy * (f("u").mean(0) - np.log(qy))).sum(-1), t["minus_U"], rtol=1e-12)
    rows = np.concatenate([-t["minus_L"] - float(c["alpha"]) * t["log_qy_label"], -t["minus_U"]])
    assert str(c["average"]) == "rows"
    np.testing.assert_allclose(rows.mean(), t["loss"], rtol=1e-12)


@pytest.mark.parametrize("variant", list(reference.VARIANTS))
def test_stored_gradients_match_finite_differences(stored, variant):
    """Spot-check three coordinates of every stored gradient by central differences, with the
    model rebuilt from the stored weights, inputs and noise alone, J averaged as stored."""
    c = of(stored, variant, "config")
    J_of_4_rows = reference.build(variant).objective(ad.Tensor(np.ones(1)), ad.Tensor(np.zeros(3))).data
    assert J_of_4_rows == {"halves": 1.0, "rows": 0.25}[str(c["average"])]
    ad.use_array_module(np, seed=0)
    model = reference.build(variant)
    model.load_state_dict(of(stored, variant, "param"))
    model.noise = adgm.Noise(fixed=of(stored, variant, "noise"))
    inputs = of(stored, variant, "input")
    x_l, y_l, x_u = ad.Tensor(inputs["x_l"]), inputs["y_l"], ad.Tensor(inputs["x_u"])

    def loss():
        return float(model.loss(x_l, y_l, x_u, float(c["alpha"]), int(c["samples"]), float(c["temperature"]))[0].data)

    np.testing.assert_allclose(loss(), stored[f"{variant}/term/loss"], rtol=1e-12)
    grads, gen = of(stored, variant, "grad"), np.random.default_rng(0)
    for name, p in model.parameters().items():
        flat = p.data.reshape(-1)
        for i in gen.choice(flat.size, size=min(3, flat.size), replace=False):
            keep = flat[i]
            flat[i] = keep + 1e-6
            up = loss()
            flat[i] = keep - 1e-6
            down = loss()
            flat[i] = keep
            expected = grads[name].reshape(-1)[i]
            assert abs((up - down) / 2e-6 - expected) <= 1e-6 * max(1.0, abs(expected)), name


def test_check_device_recomputes_the_reference_and_fails_when_it_differs(tmp_path, monkeypatch, capsys):
    """tests/check_device.py, the check to run on a GPU, here on NumPy: within 1e-10, exit 0; with
    one stored loss changed, exit 1; where no GPU is seen, --device gpu is one line and exit 2."""
    assert check_device.main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("cpu: largest relative difference")
    with np.load(reference.PATH) as z:
        changed = {k: z[k] for k in z.files}
    changed["sdgm/term/loss"] = changed["sdgm/term/loss"] * (1 + 1e-6)
    np.savez(tmp_path / "reference.npz", **changed)
    monkeypatch.setattr(reference, "PATH", tmp_path / "reference.npz")
    assert check_device.main(["--device", "cpu"]) == 1
    assert "sdgm: loss and every gradient within 1.0e-06" in capsys.readouterr().out
    monkeypatch.setattr(ad, "_import_cupy", lambda: None)                   # a machine without a GPU
    assert check_device.main(["--device", "gpu"]) == 2
    assert capsys.readouterr().err == ("error: --device gpu needs CuPy and a CUDA device; neither was found "
                                       "(pip install cupy-cuda12x, or use --device cpu)\n")
