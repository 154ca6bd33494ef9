"""The porting reference: every bound term, the loss and every gradient of small semi-supervised
models with fixed weights, inputs and noise, so a port to another framework can check itself
number for number. Regenerate tests/reference.npz with

    python tests/reference.py

and tests/test_reference.py recomputes it. Everything is float64. The names in the .npz are
'<variant>/<kind>/<name>', one variant per setting a port must get right:

  adgm           the ADGM of Sec. 2.3 with p(a|z,y), Bernoulli p(x|y,z), T = 1
  sdgm           the SDGM of Sec. 2.4: p(x|a,y,z)
  adgm-t         the ADGM with a KL temperature T = 0.5 (warm-up):
                 f = log p(x|·) + log p(y) − T·(log q(z|·) − log p(z) + log q(a|x) − log p(a|·))
  adgm-gaussian  the ADGM with a Gaussian p(x|y,z) and real-valued x (SVHN, NORB, moons)
  adgm-x_in_pa   the ADGM with p(a|z,y,x) (Eq. 5, 24) instead of p(a|z,y)
  adgm-authors   authors.ADGMAuthors, the released code's model (docs/authors-code.md): q(a|x)
                 frozen, q(z|y,x), no p(a|·), closed-form a- and z-terms, the classifier averaged
                 over the samples of a in −U(x), J the mean over all B_l + B_u rows

Sizes: S = 2 samples, B_l = 3 labeled and B_u = 4 unlabeled examples, K = 3 classes, D = 6
inputs, H = 5 hidden units (one layer), A = dim(a) = 2, Z = dim(z) = 2.

param/NAME are the weights, named as in model.state_dict(), grad/NAME dJ/dθ of every trained one
(adgm-authors: all but q(a|x)'s). A first layer with several inputs has one matrix per input,
'weight.0', 'weight.1', ... in the order the code passes them: q(a|x): x; q(y|a,x): (x, a);
q(z|a,y,x): (x, a, y) (adgm-authors: q(z|y,x): (x, y)); p(a|z,y): (z, y) (adgm-x_in_pa:
(z, y, x)); p(x|y,z): (z, y), the SDGM's p(x|a,y,z): (z, y, a). A layer computes x @ W + b
(W is (in, out)); hidden layers are followed by ReLU; a Gaussian's heads are 'head.mu' and
'head.logvar' (log σ²); a Gaussian p(x|·) has 'px_out.mu' and 'px_out.logvar', a Bernoulli one
the logits 'px_out'. Terms with suffix _l are of the labeled half (C = 1, the given class),
_u of the unlabeled half (C = K, class k in column k).

The entries below are listed as `name (shape) meaning`; tests/test_reference.py checks that
each exists, with that shape, in every variant its section names.

Every variant [adgm sdgm adgm-t adgm-gaussian adgm-x_in_pa adgm-authors]:
  config/x_dim (): D
  config/n_classes (): K
  config/hidden (1,): the hidden layer sizes, (H,)
  config/a_dim (): A
  config/z_dim (): Z
  config/samples (): S
  config/alpha (): α of Eq. 12
  config/temperature (): T
  config/average (): 'halves' (J = mean_l[L_l] + mean_u[U], the SDGM code) or 'rows' (the mean of J's rows)
  input/x_l (B_l, D): labeled inputs (binary, or real-valued for adgm-gaussian)
  input/y_l (B_l,): their classes, as indices
  input/x_u (B_u, D): unlabeled inputs
  noise/a_l (S, B_l, A): ε of a = μ + σ·ε, labeled half
  noise/z_l (S, B_l, 1, Z): ε of z, labeled half
  noise/a_u (S, B_u, A): ε of a, unlabeled half
  noise/z_u (S, B_u, K, Z): ε of z, unlabeled half; z_u[:, :, k] is the noise of class k
  term/log_px_l (S, B_l, 1): log p(x|·), Eq. 6
  term/log_px_u (S, B_u, K): log p(x|·) of every class
  term/log_qy_l (S, B_l, K): log q(y|a,x) of every class (Eq. 8), labeled half
  term/log_qy_u (S, B_u, K): log q(y|a,x) of every class, unlabeled half
  term/log_qy_label (B_l,): E_a log q(y_l|a,x_l), the classification term of Eq. 12
  term/minus_L (B_l,): −L(x,y), Eq. 10
  term/minus_U (B_u,): −U(x), Eq. 11
  term/loss (): J, Eq. 12-13
The paper's models [adgm sdgm adgm-t adgm-gaussian adgm-x_in_pa]:
  term/log_pz_l (S, B_l, 1): log p(z), Eq. 3
  term/log_pz_u (S, B_u, K): log p(z)
  term/log_qz_axy_l (S, B_l, 1): log q(z|a,y,x), Eq. 9
  term/log_qz_axy_u (S, B_u, K): log q(z|a,y,x)
  term/log_pa_zy_l (S, B_l, 1): log p(a|z,y) (adgm-x_in_pa: p(a|z,y,x)), Eq. 5
  term/log_pa_zy_u (S, B_u, K): log p(a|z,y)
  term/log_qa_x_l (S, B_l): log q(a|x), Eq. 7
  term/log_qa_x_u (S, B_u): log q(a|x)
The released code's model [adgm-authors]:
  term/log_pz_l (B_l, 1): E_q(z|y,x) log N(z; 0, I) = −½ Σ (log 2π + μ² + σ²), closed form
  term/log_pz_u (B_u, K): the same, every class
  term/log_qz_xy_l (B_l, 1): E_q(z|y,x) log q(z|y,x) = −½ Σ (log 2π + 1 + log σ²), closed form
  term/log_qz_xy_u (B_u, K): the same, every class
  term/kl_a_l (B_l,): KL(q(a|x) || N(0, I)) in closed form, the a-terms (a constant of x)
  term/kl_a_u (B_u,): the same, unlabeled half
"""
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adgm  # noqa: E402
from authors import models as authors  # noqa: E402
from cli import kinds  # noqa: E402
import autodiff as ad  # noqa: E402

PATH = pathlib.Path(__file__).resolve().parent / "reference.npz"
SIZES = dict(x_dim=6, n_classes=3, hidden=(5,), a_dim=2, z_dim=2)
B_L, B_U, SAMPLES, ALPHA = 3, 4, 2, 2.5
# variant: (model, its options, KL temperature, J's average)
VARIANTS = {
    "adgm": ("adgm", {}, 1.0, "halves"),
    "sdgm": ("sdgm", {}, 1.0, "halves"),
    "adgm-t": ("adgm", {}, 0.5, "halves"),
    "adgm-gaussian": ("adgm", {"likelihood": "gaussian"}, 1.0, "halves"),
    "adgm-x_in_pa": ("adgm", {"x_in_pa": True}, 1.0, "halves"),
    "adgm-authors": ("adgm-authors", {}, 1.0, "rows"),
}


def build(variant):
    """The variant's model (float64), with J averaged as the variant says, before its weights are set."""
    model, options, _, average = VARIANTS[variant]
    config = dict(qy_average=False, loss_average=average, authors_order=False)
    return authors.study_class(kinds.MODELS[model].cls, config)(**SIZES, **options, dtype="float64")


def reference_values(variant):
    """All reference arrays of one variant, computed afresh."""
    ad.use_array_module(np, seed=1234)
    model = build(variant)
    _, _, temperature, average = VARIANTS[variant]
    D, K, A, Z = SIZES["x_dim"], SIZES["n_classes"], SIZES["a_dim"], SIZES["z_dim"]
    gen = np.random.default_rng(5678)
    for _, t in model.named_tensors():  # a generic point: no zero biases, no tiny heads, so
        t.data += 0.3 * gen.standard_normal(t.shape)  # no ReLU sits exactly at its kink
    if model.likelihood == "gaussian":
        x_l, x_u = gen.standard_normal((B_L, D)), gen.standard_normal((B_U, D))
    else:
        x_l = (gen.random((B_L, D)) < 0.5).astype(np.float64)
        x_u = (gen.random((B_U, D)) < 0.5).astype(np.float64)
    y_l = np.arange(B_L) % K
    noise = {"a_l": gen.standard_normal((SAMPLES, B_L, A)), "z_l": gen.standard_normal((SAMPLES, B_L, 1, Z)),
             "a_u": gen.standard_normal((SAMPLES, B_U, A)), "z_u": gen.standard_normal((SAMPLES, B_U, K, Z))}
    model.noise = adgm.Noise(fixed=noise)

    out = {f"config/{k}": np.asarray(v) for k, v in SIZES.items()}
    out.update({"config/samples": np.asarray(SAMPLES), "config/alpha": np.asarray(ALPHA),
                "config/temperature": np.asarray(temperature), "config/average": np.asarray(average)})
    out.update({f"param/{k}": v for k, v in model.state_dict().items()})
    out.update({"input/x_l": x_l, "input/y_l": y_l, "input/x_u": x_u})
    out.update({f"noise/{k}": v for k, v in noise.items()})

    # The terms, computed the way the loss computes them.
    by_authors = isinstance(model, authors.ADGMAuthors)
    names = ({"log_px": "log_px", "log_pz": "log_pz", "log_qz_axy": "log_qz_xy", "kl_a": "kl_a"} if by_authors else
             {k: k for k in ("log_px", "log_pz", "log_qz_axy", "log_pa_zy", "log_qa_x")})
    for half, x in (("l", x_l), ("u", x_u)):
        X = ad.Tensor(x)
        ys = model._all_classes() if half == "u" else model._onehot(y_l).reshape(B_L, 1, K)
        q = model.draw([(X, ys.shape[-2], half)], SAMPLES)[0]
        t = model.f(X, ys, q, temperature)[1]
        for name, stored in names.items():
            out[f"term/{stored}_{half}"] = t[name].data
        out[f"term/log_qy_{half}"] = q.log_qy_ax.data
    minus_L, log_qy_label, _, _ = model.labeled_bound(ad.Tensor(x_l), y_l, SAMPLES, temperature)
    minus_U, _, _, _ = model.unlabeled_bound(ad.Tensor(x_u), SAMPLES, temperature)
    J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), ALPHA, SAMPLES, temperature)
    J.backward()
    out.update({"term/minus_L": minus_L.data, "term/log_qy_label": log_qy_label.data,
                "term/minus_U": minus_U.data, "term/loss": J.data})
    out.update({f"grad/{k}": p.grad.copy() for k, p in model.parameters().items()})
    return {f"{variant}/{k}": v for k, v in out.items()}


def all_reference_values():
    return {k: v for variant in VARIANTS for k, v in reference_values(variant).items()}


def documented():
    """[(variants, name, shape as symbols, meaning)] of the entries listed in this docstring."""
    import re
    entries, variants = [], None
    for line in __doc__.splitlines():
        section = re.search(r"\[([\w\s-]+)\]:$", line)
        entry = re.match(r"  (\w+/\w+) \(([^)]*)\): (.*)$", line)
        if section:
            variants = section.group(1).split()
        elif entry and variants:
            shape = tuple(s.strip() for s in entry.group(2).split(",") if s.strip())
            entries.append((variants, entry.group(1), shape, entry.group(3)))
    return entries


if __name__ == "__main__":
    values = all_reference_values()
    np.savez_compressed(PATH, **values)
    print(f"wrote {len(values)} arrays to {PATH}")
