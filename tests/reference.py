"""The porting reference: every bound term, the loss and every gradient of a small ADGM and SDGM
with fixed weights, inputs and noise, so a port to another framework can check itself number
for number. Regenerate tests/reference.npz with

    python tests/reference.py

and tests/test_reference.py recomputes it. Everything is float64. The names in the .npz are
'<model>/<kind>/<name>' with <model> in {adgm, sdgm} and <kind>:

  config/...   the sizes: x_dim, n_classes, hidden, a_dim, z_dim, samples, alpha, temperature
  param/NAME   the weights, named as in model.parameters(). A first layer with several inputs
               has one matrix per input, 'weight.0', 'weight.1', ... in the order the code passes
               them: q(a|x): x; q(y|a,x): (x, a); q(z|a,y,x): (x, a, y); p(a|z,y): (z, y);
               p(x|y,z): (z, y) for the ADGM, (z, y, a) for the SDGM. A layer computes
               x @ W + b (W is (in, out)); hidden layers are followed by ReLU; a Gaussian's
               heads are 'head.mu' and 'head.logvar' (log σ²).
  input/...    x_l (B_l, D), y_l (B_l,) class indices, x_u (B_u, D)
  noise/...    ε of the reparameterisations: a_l (S, B_l, A), z_l (S, B_l, 1, Z),
               a_u (S, B_u, A), z_u (S, B_u, K, Z) — z_u[:, :, k] is the noise of class k
  term/...     labeled (C = 1) and unlabeled (C = K) terms of f, each (S, B, C): log_px, log_pz,
               log_qz_axy, log_pa_zy; log_qa_x (S, B); log_qy (S, B, K) = log q(y|a,x);
               minus_L (B_l,) = −L(x,y) (Eq. 10); log_qy_l (B_l,) = E_a log q(y_l|a,x_l);
               minus_U (B_u,) = −U(x) (Eq. 11); loss () = J (Eq. 12-13)
  grad/NAME    dJ/dθ for every parameter
"""
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adgm  # noqa: E402
import autodiff as ad  # noqa: E402

PATH = pathlib.Path(__file__).resolve().parent / "reference.npz"
SIZES = dict(x_dim=6, n_classes=3, hidden=(5,), a_dim=2, z_dim=2)
B_L, B_U, SAMPLES, ALPHA, TEMPERATURE = 3, 4, 2, 2.5, 1.0


def reference_values(kind):
    """All reference arrays of one model ('adgm' or 'sdgm'), computed afresh."""
    ad.use_array_module(np, seed=1234)
    model = adgm.MODELS[kind](**SIZES, dtype="float64")
    D, K, A, Z = SIZES["x_dim"], SIZES["n_classes"], SIZES["a_dim"], SIZES["z_dim"]
    gen = np.random.default_rng(5678)
    for p in model.parameters().values():  # a generic point: no zero biases, no tiny heads, so
        p.data += 0.3 * gen.standard_normal(p.shape)  # no ReLU sits exactly at its kink
    x_l = (gen.random((B_L, D)) < 0.5).astype(np.float64)
    x_u = (gen.random((B_U, D)) < 0.5).astype(np.float64)
    y_l = np.arange(B_L) % K
    noise = {"a_l": gen.standard_normal((SAMPLES, B_L, A)), "z_l": gen.standard_normal((SAMPLES, B_L, 1, Z)),
             "a_u": gen.standard_normal((SAMPLES, B_U, A)), "z_u": gen.standard_normal((SAMPLES, B_U, K, Z))}
    model.noise = adgm.Noise(fixed=noise)

    out = {f"config/{k}": np.asarray(v) for k, v in SIZES.items()}
    out.update({"config/samples": np.asarray(SAMPLES), "config/alpha": np.asarray(ALPHA),
                "config/temperature": np.asarray(TEMPERATURE)})
    out.update({f"param/{k}": v for k, v in model.state_dict().items()})
    out.update({"input/x_l": x_l, "input/y_l": y_l, "input/x_u": x_u})
    out.update({f"noise/{k}": v for k, v in noise.items()})

    # The terms, computed the way the loss computes them.
    for half, x, y in (("l", x_l, y_l.reshape(B_L, 1)), ("u", x_u, None)):
        X = ad.Tensor(x)
        a, log_qa_x = model._sample_a(X, SAMPLES, half)
        ys = model._all_classes() if y is None else model._onehot(y_l).reshape(B_L, 1, K)
        t = model._joint(X, ys, a, SAMPLES, half)
        for name in ("log_px", "log_pz", "log_qz_axy", "log_pa_zy"):
            out[f"term/{name}_{half}"] = t[name].data
        out[f"term/log_qa_x_{half}"] = log_qa_x.data
        out[f"term/log_qy_{half}"] = model.log_qy(X, a).data
    minus_L, log_qy_l, _, _ = model.labeled_bound(ad.Tensor(x_l), y_l, SAMPLES, TEMPERATURE)
    minus_U, _, _, _ = model.unlabeled_bound(ad.Tensor(x_u), SAMPLES, TEMPERATURE)
    J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), ALPHA, SAMPLES, TEMPERATURE)
    J.backward()
    out.update({"term/minus_L": minus_L.data, "term/log_qy_l": log_qy_l.data,
                "term/minus_U": minus_U.data, "term/loss": J.data})
    out.update({f"grad/{k}": p.grad.copy() for k, p in model.parameters().items()})
    return {f"{kind}/{k}": v for k, v in out.items()}


def all_reference_values():
    return {**reference_values("adgm"), **reference_values("sdgm")}


if __name__ == "__main__":
    values = all_reference_values()
    np.savez_compressed(PATH, **values)
    print(f"wrote {len(values)} arrays to {PATH}")
