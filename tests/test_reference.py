"""The porting reference (tests/reference.npz) is what the code computes today, and it is
self-consistent: −U(x) assembled by hand from its terms, and the gradients by finite differences."""
import numpy as np
import pytest

import reference


@pytest.fixture(scope="module")
def stored():
    with np.load(reference.PATH, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_reference_file_matches_the_code(stored):
    fresh = reference.all_reference_values()
    assert sorted(fresh) == sorted(stored)
    for name, value in fresh.items():
        np.testing.assert_allclose(value, stored[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind", ["adgm", "sdgm"])
def test_unlabeled_bound_from_the_stored_terms(stored, kind):
    """−U(x) = mean_s Σ_y q(y|a_s,x)(f_sy − log q(y|a_s,x)), with f from the stored terms."""
    t = {k.split("/", 2)[2]: v for k, v in stored.items() if k.startswith(f"{kind}/term/")}
    f = (t["log_px_u"] + t["log_pz_u"] + t["log_pa_zy_u"] - np.log(stored[f"{kind}/config/n_classes"])
         - t["log_qz_axy_u"] - t["log_qa_x_u"][..., None])
    qy = np.exp(t["log_qy_u"])
    np.testing.assert_allclose((qy * (f - t["log_qy_u"])).sum(-1).mean(0), t["minus_U"], rtol=1e-12)
    alpha = float(stored[f"{kind}/config/alpha"])
    J = (-t["minus_L"] - alpha * t["log_qy_l"]).mean() + (-t["minus_U"]).mean()
    np.testing.assert_allclose(J, t["loss"], rtol=1e-12)


def test_stored_gradients_match_finite_differences(stored):
    """Spot-check three coordinates of every stored gradient of the ADGM by central differences."""
    import adgm
    import autodiff as ad
    ad.use_array_module(np, seed=0)
    s = {k[5:]: v for k, v in stored.items() if k.startswith("adgm/")}
    sizes = {k: s[f"config/{k}"] for k in reference.SIZES}
    model = adgm.ADGM(int(sizes["x_dim"]), int(sizes["n_classes"]), tuple(int(h) for h in sizes["hidden"]),
                      int(sizes["a_dim"]), int(sizes["z_dim"]), dtype="float64")
    model.load_state_dict({k[6:]: v for k, v in s.items() if k.startswith("param/")})
    model.noise = adgm.Noise(fixed={k[6:]: v for k, v in s.items() if k.startswith("noise/")})
    x_l, y_l, x_u = (ad.Tensor(s["input/x_l"]), s["input/y_l"], ad.Tensor(s["input/x_u"]))

    def loss():
        return float(model.loss(x_l, y_l, x_u, float(s["config/alpha"]), int(s["config/samples"]))[0].data)

    gen = np.random.default_rng(0)
    for name, p in model.parameters().items():
        flat = p.data.reshape(-1)
        for i in gen.choice(flat.size, size=min(3, flat.size), replace=False):
            keep = flat[i]
            flat[i] = keep + 1e-6
            up = loss()
            flat[i] = keep - 1e-6
            down = loss()
            flat[i] = keep
            expected = s[f"grad/{name}"].reshape(-1)[i]
            assert abs((up - down) / 2e-6 - expected) <= 1e-6 * max(1.0, abs(expected)), name
