"""Auxiliary Deep Generative Models (Maaløe, Sønderby, Sønderby, Winther, ICML 2016).

The models of the paper, written with the paper's names, on top of autodiff.py:

    ADGM   q(a|x) q(y|a,x) q(z|a,y,x)     p(y) p(z) p(a|z,y[,x]) p(x|y,z)     (Eq. 3-9, 24)
    SDGM   the same q                     p(y) p(z) p(a|z,y)     p(x|a,y,z)   (Sec. 2.4, Eq. 25)
    M2     q(y|x) q(z|y,x)                p(y) p(z)              p(x|y,z)     (Kingma et al. 2014)
    ADGM with a deterministic a = f(x): no a-terms in the bound             (the ablation of Fig. 5)

plus the unsupervised auxiliary VAE with one or two stochastic layers (Eq. 19-20) and the
two-dimensional potential model of Sec. 4.1 (Eq. 18). Every log-density is one line named
after its factor (log_qz_axy is log q(z|a,y,x)); the bounds are summed in one line each.

How y is summed out in −U(x) (Eq. 11, 17). Every network that takes y sees a "class axis" C:

    labeled   x (B, 1, D)   y one-hot (B, 1, K)     C = 1, the given class
    unlabeled x (B, 1, D)   y = eye(K) (1, K, K)    C = K, every class at once
    a         (S, B, 1, A)  S Monte-Carlo samples of a ~ q(a|x)

The first layer of such a network is W_x x + W_a a + W_y y + b (autodiff.Linear with several
inputs): x and a are projected once per example and sample, y once per class, and the sums
broadcast to (S, B, C, H). Everything after it is one matrix product over S*B*C rows, so there
is no Python loop over classes or samples.
"""
import itertools
import math
from typing import NamedTuple

import autodiff as ad

# ---------------------------------------------------------------------------------------------
# Log-densities, summed over the last (unit) axis
# ---------------------------------------------------------------------------------------------

log_normal = ad.normal_log_prob        # log N(x; μ, diag σ²) with log σ² given, one autodiff primitive
log_bernoulli = ad.bernoulli_log_prob  # log Bern(x; sigmoid(l)) = x·l − log(1 + e^l), stable for any logit
sample_normal = ad.normal_sample       # the reparameterised μ + σ·ε (Kingma & Welling 2014)


def log_normal_units(x, mu, logvar):
    """log N(x_i; μ_i, σ_i²) of each unit, with log σ² given (log_normal is their sum)."""
    return -0.5 * (ad.LOG_2PI + logvar + (x - mu) ** 2 * ad.exp(-logvar))


def log_standard_normal(x):
    """log N(x; 0, I)."""
    return -0.5 * ((x * x).sum(axis=-1) + x.shape[-1] * ad.LOG_2PI)


def log_categorical(y_onehot, log_probs):
    return (y_onehot * log_probs).sum(axis=-1)


def log_mean_exp(values, axis=0, keepdims=False):
    """log (1/K) Σ_k exp(values_k), stable (the importance-weighted bound)."""
    return ad.logsumexp(values, axis=axis, keepdims=keepdims) - math.log(values.shape[axis])


class Noise:
    """Where ε comes from: the backend generator, or fixed arrays by name (a port checks itself
    against our numbers with them): 'a_l', 'z_l' (labeled half), 'a_u', 'z_u' (unlabeled)."""

    def __init__(self, fixed=None):
        self.fixed = fixed

    def __call__(self, name, shape, dtype):
        if self.fixed is None:
            return ad.rng.normal(shape, dtype)
        eps = self.fixed[name]
        assert tuple(eps.shape) == tuple(shape), f"noise {name}: {eps.shape} != {shape}"
        return eps


# ---------------------------------------------------------------------------------------------
# Semi-supervised models: ADGM, SDGM, M2 and the deterministic-a ablation
# ---------------------------------------------------------------------------------------------

class Draws(NamedTuple):
    """The Monte-Carlo draws (Eq. 17) of one half of a batch that its bound averages over: a ~ q(a|x)
    (S, B, A), drawn with μ, log σ² (B, A) of q(a|x), and log q(a|x) (S, B) at it; log q(y|a,x)
    (S|1, B, K) at those a; and the noise ε (S, B, C, Z) of z ~ q(z|a,y,x), one z per class on y's
    axis C. The deterministic a is μ itself (1, B, A) with no log q(a|x); M2 has no a (None)."""
    a: object
    qa: tuple
    log_qa_x: object
    log_qy_ax: object
    eps_z: object


class SemiSupervised(ad.Module):
    """The semi-supervised models of Sec. 2; subclasses say what a is and where it goes.

    auxiliary: 'stochastic' (a ~ q(a|x)), 'deterministic' (a = mean of q(a|x)), or None (M2).
    a_in_px:   p(x|a,y,z) instead of p(x|y,z) (the SDGM).
    x_in_pa:   p(a|z,y,x) instead of p(a|z,y) (Eq. 5, 24; the benchmark used p(a|z,y)).

    Reading order: _networks (the factors of q and p), f (the log-ratio f(x,y,a,z), one factor per
    line), labeled_bound and unlabeled_bound (the expectations of f that bound log p(x,y) and
    log p(x)), and loss, the objective J of a batch made of those two bounds. draw makes the
    samples of a, q(y|a,x) at them and the noise of z that the bounds average over.
    """
    auxiliary, a_in_px = "stochastic", False

    def __init__(self, x_dim, n_classes, hidden=(500, 500), a_dim=100, z_dim=100,
                 likelihood="bernoulli", x_in_pa=False, batchnorm=False, dtype="float32"):
        assert likelihood in ("bernoulli", "gaussian")
        if x_in_pa and self.a_in_px:
            raise ValueError("x_in_pa: the SDGM generates a before x, so p(a|z,y) cannot see x")
        self.x_dim, self.n_classes, self.a_dim, self.z_dim = x_dim, n_classes, a_dim, z_dim
        self.likelihood, self.x_in_pa, self.batchnorm, self.dtype = likelihood, x_in_pa, batchnorm, dtype
        self.noise = Noise()
        self._networks(x_dim, n_classes, a_dim, z_dim, tuple(hidden), dict(batchnorm=batchnorm, dtype=dtype))
        self.classes = ad.xp.eye(n_classes, dtype=dtype)  # the one-hot y of each class, made once on the device

    def _networks(self, D, K, A, Z, H, net):
        """One network per factor; a Gaussian is an MLP with μ and log σ² heads (Eq. 14-16)."""
        a = (A,) if self.auxiliary is not None else ()                               # a as an input, if any
        # inference model q
        self.qa_x = ad.Gaussian(D, H, A, **net) if a else None                       # q(a|x), Eq. 7
        self.qy_ax = ad.MLP((D, *a), H, **net)                                       # q(y|a,x), Eq. 8
        self.qy_logits = ad.Linear(H[-1], K, dtype=self.dtype)
        self.qz_axy = ad.Gaussian((D, *a, K), H, Z, **net)                           # q(z|a,y,x), Eq. 9
        # generative model p
        self.pa_zy = (ad.Gaussian((Z, K, D) if self.x_in_pa else (Z, K), H, A, **net)
                      if self.auxiliary == "stochastic" else None)                   # p(a|z,y[,x]), Eq. 5
        self.px_net = ad.MLP((Z, K, *a) if self.a_in_px else (Z, K), H, **net)       # p(x|[a,]y,z), Eq. 6, 25
        self.px_out = (ad.Linear(H[-1], D, dtype=self.dtype) if self.likelihood == "bernoulli"
                       else ad.GaussianHead(H[-1], D, dtype=self.dtype))

    # -- the factors --------------------------------------------------------------------------

    def _onehot(self, y):
        return ad.Tensor(self.classes[y])

    def _all_classes(self):  # y = every class at once, (1, K, K), to broadcast over the batch
        return ad.Tensor(self.classes[None])

    def _sample_a(self, x, samples, name="u", qa=None):
        """a ~ q(a|x) (S, B, A) and the μ, log σ² (B, A) it is drawn with (qa, if computed
        already); the deterministic a is μ itself (1, B, A); M2 has none (None, None, None)."""
        if self.qa_x is None:
            return None, None, None
        mu, logvar = qa or self.qa_x(x)
        if self.auxiliary == "deterministic":
            return mu.reshape(1, *mu.shape), mu, logvar
        eps = self.noise("a_" + name, (samples,) + mu.shape, mu.dtype)
        return sample_normal(mu, logvar, ad.Tensor(eps)), mu, logvar

    def log_qy(self, x, a):
        """log q(y|a,x) (S, B, K) as a log-softmax (Eq. 8); M2's q(y|x) has S = 1."""
        h = self.qy_ax(x, a) if a is not None else self.qy_ax(x).reshape(1, x.shape[0], -1)
        return ad.log_softmax(self.qy_logits(h), axis=-1)

    def _log_px(self, x, h):
        """log p(x|·) from the last hidden layer h of p(x|·)."""
        return log_bernoulli(x, self.px_out(h)) if self.likelihood == "bernoulli" else log_normal(x, *self.px_out(h))

    def _qz(self, xb, ab, y):
        """μ, log σ² of q(z|a,y,x) (M2: q(z|y,x))."""
        return self.qz_axy(xb, ab, y) if ab is not None else self.qz_axy(xb, y)

    def _pa(self, z, y, xb):
        """μ, log σ² of p(a|z,y) (or p(a|z,y,x))."""
        return self.pa_zy(z, y, xb) if self.x_in_pa else self.pa_zy(z, y)

    # -- the bounds ---------------------------------------------------------------------------

    def draw(self, halves, samples, classifier=True):
        """The Draws of each half (x, C, name) of a batch, in a list: a half at a time, a ~ q(a|x)
        (its noise named 'a_' + name) and the noise of z ('z_' + name) for C classes on y's axis;
        then q(y|a,x) at those a. The halves go through q(a|x) and q(y|a,x) as one batch, one
        matrix product per layer for all of them (_together). classifier=False leaves q(y|a,x) out
        (the importance weights need none)."""
        xs = [(x,) for x, _, _ in halves]
        qa = self._together(self.qa_x, xs) if self.qa_x is not None else [None] * len(halves)  # μ, log σ²
        drawn = []
        for (x, C, name), qa_x in zip(halves, qa):
            a, mu, logvar = self._sample_a(x, samples, name, qa_x)                   # a ~ q(a|x), Eq. 7
            log_qa_x = log_normal(a, mu, logvar) if self.auxiliary == "stochastic" else None  # (S, B)
            eps_z = ad.Tensor(self.noise("z_" + name, (samples, x.shape[0], C, self.z_dim), self.dtype))
            drawn.append(Draws(a, (mu, logvar), log_qa_x, None, eps_z))
        if not classifier:
            return drawn
        log_qy_ax = self._together(self.log_qy, [(x, q.a) for (x, _, _), q in zip(halves, drawn)])  # q(y|a,x), Eq. 8
        return [q._replace(log_qy_ax=log_qy) for q, log_qy in zip(drawn, log_qy_ax)]

    def f(self, x, y, q, temperature=1.0, temperature_a=1.0):
        """f (S, B, C) for every class on y's axis C, with a and the noise of z from the draws q:
            f(x,y,a,z) = log p(x,y,a,z) − log q(a,z|x,y)                        (Eq. 10)
                       = log p(x|·) + log p(y) + log p(z) + log p(a|·) − log q(a|x) − log q(z|a,y,x).
        With the KL temperature T of warm-up and T_a on a's terms alone (Sec. 4.3, 5) it is
        log p(x|·) + log p(y) − T·(KL_z + T_a·KL_a), KL_z = log q(z|·) − log p(z) and KL_a =
        log q(a|x) − log p(a|·); T = T_a = 1 is f itself. M2 and a deterministic a have no a-terms.
        x (B, D); y (B, 1, K) one-hot or (1, K, K) every class. Returns f, its terms, KL_z + KL_a."""
        B, stochastic = x.shape[0], self.auxiliary == "stochastic"
        xb = x.reshape(B, 1, self.x_dim)                                             # (B, 1, D)
        ab = q.a.reshape(q.a.shape[0], B, 1, self.a_dim) if q.a is not None else None  # (S|1, B, 1, A)
        t = {"log_qa_x": q.log_qa_x} if stochastic else {}                           # q(a|x), Eq. 7: from draw
        mu, logvar = self._qz(xb, ab, y)                                             # (S|1, B, C, Z)
        z = sample_normal(mu, logvar, q.eps_z)                                       # (S, B, C, Z)
        t["log_qz_axy"] = log_normal(z, mu, logvar)                                  # q(z|a,y,x), Eq. 9
        t["log_pz"] = log_standard_normal(z)                                         # p(z) = N(0, I), Eq. 3
        t["log_py"] = -math.log(self.n_classes)                                      # p(y) uniform, Eq. 4
        if stochastic:
            t["log_pa_zy"] = log_normal(ab, *self._pa(z, y, xb))                     # p(a|z,y[,x]), Eq. 5
        h = self.px_net(z, y, ab) if self.a_in_px else self.px_net(z, y)
        t["log_px"] = self._log_px(xb, h)                                            # p(x|[a,]y,z), Eq. 6, 25
        kl = weighted = kl_z = t["log_qz_axy"] - t["log_pz"]
        if stochastic:
            log_qa_x = t["log_qa_x"].reshape(*t["log_qa_x"].shape, 1)                # (S, B, 1)
            kl = kl_z + log_qa_x - t["log_pa_zy"]                                    # KL_z + KL_a
            weighted = kl if temperature_a == 1.0 else kl_z + temperature_a * (log_qa_x - t["log_pa_zy"])
        return t["log_px"] + t["log_py"] - temperature * weighted, t, kl              # f(x,y,a,z), Eq. 10

    def labeled_bound(self, x, y, samples=1, temperature=1.0, temperature_a=1.0, q=None):
        """−L(x,y) = E_q(a|x)q(z|a,y,x)[ f(x,y,a,z) ] (B,), the bound on log p(x,y) of Eq. 10, by
        Monte Carlo over `samples` draws; E_q(a|x)[log q(y|a,x)] (B,), the classification term of
        L_l (Eq. 12); the terms of f and its KL part (see f). q: the draws of x, if made already."""
        x = ad.as_tensor(x, self.dtype)
        q = q or self.draw([(x, 1, "l")], samples)[0]                                # C = 1: the given class
        y1 = self._onehot(y).reshape(x.shape[0], 1, -1)                              # (B, 1, K)
        f, t, kl = self.f(x, y1, q, temperature, temperature_a)                      # f (S, B, 1)
        minus_L = f.mean(axis=0).reshape(-1)                                         # −L(x,y), Eq. 10
        log_qy_label = log_categorical(self._onehot(y), q.log_qy_ax).mean(axis=0)    # E_a log q(y|a,x), Eq. 8
        return minus_L, log_qy_label, t, kl

    def unlabeled_bound(self, x, samples=1, temperature=1.0, temperature_a=1.0, q=None):
        """−U(x) per example, the bound on log p(x) of Eq. 11 with y summed out exactly (Eq. 17, 27):
            −U(x) = E_q(a|x)[ Σ_y q(y|a,x) (E_q(z|a,y,x)[f(x,y,a,z)] − log q(y|a,x)) ];
        also q(y|a,x) (S|1, B, K), the terms of f with f itself and log_qy_ax, and its KL part.
        q: the draws of x, if made already."""
        x = ad.as_tensor(x, self.dtype)
        q = q or self.draw([(x, self.n_classes, "u")], samples)[0]                   # C = K: every class
        f, t, kl = self.f(x, self._all_classes(), q, temperature, temperature_a)     # f (S, B, K)
        qy = ad.exp(q.log_qy_ax)                                                     # q(y|a,x), Eq. 8
        minus_U = (qy * (f - q.log_qy_ax)).sum(axis=-1).mean(axis=0)                 # −U(x), Eq. 11; samples, Eq. 17
        t.update(f=f, log_qy_ax=q.log_qy_ax)
        return minus_U, qy, t, kl

    def objective(self, L_l, U):
        """The objective J of a batch (Eq. 13) from the L_l (B_l,) of its labeled rows (Eq. 12) and
        the U (B_u,) of its unlabeled ones: each sum of J as its half's mean, as the authors' SDGM
        code weighs them (docs/authors-code.md, sdgmssl.py:301), so that α = β·N/N_l sets the balance."""
        return L_l.mean() + U.mean()

    def loss(self, x_l, y_l, x_u, alpha, samples=1, temperature=1.0, temperature_a=1.0):
        """The minibatch objective J (Eq. 13) of L_l = L + α·E_a[−log q(y_l|a,x_l)] (Eq. 12) and U:
        labeled_bound(x_l, y_l) and unlabeled_bound(x_u), with the draws of both halves made
        together (draw), and the terms to log (device scalars: no host sync). x_l (B_l, D) and
        x_u (B_u, D) are Tensors or arrays (taken in the model's dtype), y_l (B_l,) class indices.

        With BatchNorm, the running averages that evaluation uses are those of the unlabeled half
        alone: evaluation runs every class through the networks that take y, as the unlabeled
        half does, and the labeled half's single true class gives their layers other statistics.
        """
        S, T, T_a = samples, temperature, temperature_a
        x_l, x_u = ad.as_tensor(x_l, self.dtype), ad.as_tensor(x_u, self.dtype)
        q_l, q_u = self.draw([(x_l, 1, "l"), (x_u, self.n_classes, "u")], S)        # a, q(y|a,x), ε of z
        with ad.frozen_averages():                                                   # BatchNorm: see above
            minus_L, log_qy_label, t_l, kl_l = self.labeled_bound(x_l, y_l, S, T, T_a, q_l)
        minus_U, qy, t_u, kl_u = self.unlabeled_bound(x_u, S, T, T_a, q_u)
        J = self.objective(-minus_L - alpha * log_qy_label, -minus_U)               # L_l, Eq. 12; J, Eq. 13
        # The unlabeled terms to log are weighted by q(y|a,x), as in −U(x).
        under_qy = lambda v: (qy.data * v).sum(axis=-1).mean()                      # noqa: E731
        kl_z = under_qy(t_u["log_qz_axy"].data - t_u["log_pz"].data)
        stats = {"loss": J.data, "bound_labeled": minus_L.data.mean(), "bound_unlabeled": minus_U.data.mean(),
                 "log_px": under_qy(t_u["log_px"].data), "kl_z": kl_z, "kl_a": under_qy(kl_u.data) - kl_z,
                 "cross_entropy": -log_qy_label.data.mean(), "entropy_qy": -under_qy(t_u["log_qy_ax"].data)}
        return J, stats

    def _together(self, fn, halves):
        """[fn(*inputs) for inputs in halves] computed as one batch: each input concatenated over
        the halves along the example axis (−2), the outputs split back along it. With BatchNorm
        each half keeps its own batch statistics, so there they go one by one, and only the last
        moves the running averages (the unlabeled half: see loss)."""
        if len(halves) == 1:
            return [fn(*halves[0])]
        if self.batchnorm:
            with ad.frozen_averages():
                out = [fn(*inputs) for inputs in halves[:-1]]
            return out + [fn(*halves[-1])]
        out = fn(*(None if v[0] is None else ad.concat(v, axis=-2) for v in zip(*halves)))
        ends = list(itertools.accumulate(inputs[0].shape[-2] for inputs in halves))
        split = lambda t: [t[..., i:j, :] for i, j in zip([0] + ends, ends)]        # noqa: E731
        return list(zip(*map(split, out))) if isinstance(out, tuple) else split(out)

    # -- prediction and analysis --------------------------------------------------------------

    def predict(self, x, samples=10):
        """argmax_y of q(y|a,x) averaged over `samples` draws of a (the authors' evaluation)."""
        with ad.no_grad():
            x = ad.as_tensor(x, self.dtype)
            a = self._sample_a(x, samples)[0]
            return ad.xp.exp(self.log_qy(x, a).data).mean(axis=0).argmax(axis=-1)

    def predict_bayes(self, x, samples=10):
        """The Bayes classifier of Sec. 5: argmax_y p(x,y) ≈ exp(−L(x,y)), −L averaged over samples."""
        return self.evaluate(x, samples)[1]

    def evaluate(self, x, samples=10):
        """One pass for the test set: (argmax of averaged q(y|a,x), the Bayes classifier's
        argmax_y −L(x,y), and −U(x)), each (B,)."""
        with ad.no_grad():
            minus_U, qy, t, _ = self.unlabeled_bound(x, samples)                    # qy (S|1, B, K)
            return qy.data.mean(axis=0).argmax(axis=-1), t["f"].data.mean(axis=0).argmax(axis=-1), minus_U.data

    def log_likelihood(self, x, iw_samples=100, chunk=10):
        """Importance-weighted estimate of log p(x) (B,): with y summed out exactly,
        log p(x) ≈ log (1/K) Σ_k Σ_y exp f(x, y, a_k, z_ky), since q(y|a,x) cancels."""
        with ad.no_grad():
            x = ad.as_tensor(x, self.dtype)
            parts = [ad.logsumexp(self.log_weights(x, min(chunk, iw_samples - s)), axis=-1).data  # (S, B)
                     for s in range(0, iw_samples, chunk)]
            return log_mean_exp(ad.Tensor(ad.xp.concatenate(parts, axis=0)), axis=0).data

    def log_weights(self, x, samples):
        """The importance weights f(x, y, a, z) = log p(x,y,a,z) − log q(a,z|x,y) (S, B, K) of every
        class, with a ~ q(a|x) and z ~ q(z|a,y,x)."""
        q = self.draw([(x, self.n_classes, "u")], samples, classifier=False)[0]
        return self.f(x, self._all_classes(), q)[0]

    def encode(self, x):
        """Means of q(a|x) (B, A) and of q(z|a,y,x) (B, Z) with a at its mean and y predicted."""
        with ad.no_grad():
            x = ad.as_tensor(x, self.dtype)
            a = self.qa_x(x)[0] if self.qa_x is not None else None
            y = self.log_qy(x, a.reshape(1, *a.shape) if a is not None else None).data[0].argmax(axis=-1)
            return (a.data if a is not None else None), self._qz(x, a, self._onehot(y))[0].data

    def generate(self, y, z):
        """Mean of p(x|y,z) (SDGM: a drawn from p(a|z,y) first). y (N,) ints, z (N, Z)."""
        with ad.no_grad():
            z, y = ad.as_tensor(z, self.dtype), self._onehot(y)
            inputs = (z, y)
            if self.a_in_px:
                mu, logvar = self.pa_zy(z, y)
                inputs = (z, y, sample_normal(mu, logvar, ad.Tensor(ad.rng.normal(mu.shape, mu.dtype))))
            h = self.px_net(*inputs)
            return ad.sigmoid(self.px_out(h)).data if self.likelihood == "bernoulli" else self.px_out(h)[0].data

    def kl_per_unit(self, x, samples=1):
        """Per-unit KL of a and z (Fig. 4a), averaged over x and q(y|a,x): for z the closed form
        KL(q(z|a,y,x) || N(0,1)); for a the Monte-Carlo log q(a|x) − log p(a|z,y) per unit."""
        with ad.no_grad():
            x = ad.as_tensor(x, self.dtype)
            a, mu_a, logvar_a = self._sample_a(x, samples)
            B, xb, y = x.shape[0], x.reshape(x.shape[0], 1, self.x_dim), self._all_classes()
            ab = a.reshape(a.shape[0], B, 1, self.a_dim) if a is not None else None
            mu, logvar = self._qz(xb, ab, y)                                         # (S|1, B, K, Z)
            qy = ad.exp(self.log_qy(x, a)).reshape(-1, B, self.n_classes, 1)         # (S|1, B, K, 1)
            kl_z = 0.5 * (mu ** 2 + ad.exp(logvar) - 1 - logvar)                     # KL(q(z|·) || N(0, 1))
            kl_z = (qy * kl_z).sum(axis=2).mean(axis=(0, 1)).data
            if self.pa_zy is None:
                return None, kl_z
            z = sample_normal(mu, logvar, ad.Tensor(ad.rng.normal(mu.shape, mu.dtype)))
            kl_a = (log_normal_units(a, mu_a, logvar_a).reshape(*ab.shape)           # log q(a|x) − log p(a|z,y)
                    - log_normal_units(ab, *self._pa(z, y, xb)))                     # (S, B, K, A)
            return (qy * kl_a).sum(axis=2).mean(axis=(0, 1)).data, kl_z


class ADGM(SemiSupervised):
    """Auxiliary deep generative model (Sec. 2.3)."""


class SDGM(SemiSupervised):
    """Skip deep generative model (Sec. 2.4): a is part of the generative model, p(x|a,y,z)."""
    a_in_px = True


class M2(SemiSupervised):
    """Kingma et al. (2014) M2: the same model without an auxiliary variable."""
    auxiliary = None


class ADGMDeterministic(SemiSupervised):
    """The ablation of Fig. 5: a = f(x), the mean of q(a|x), with no a-terms in the bound."""
    auxiliary = "deterministic"


# ---------------------------------------------------------------------------------------------
# Unsupervised auxiliary VAE with L stochastic layers (Sec. 4.3, Eq. 19-20)
# ---------------------------------------------------------------------------------------------

class AuxiliaryVAE(ad.Module):
    """q(a,z|x) = q(a_1|x) q(z_1|a_1,x) Π_{i≥2} q(a_i|a_{i−1},x) q(z_i|a_i,z_{i−1})     (Eq. 19)
    p(x,a,z) = p(x|z_1) p(z_L) p(a_L|z_L) Π_{i<L} p(z_i|z_{i+1}) p(a_i|z_{≥i})      (Eq. 20)
    Layers are numbered from 0 here (a[0] is a_1)."""

    def __init__(self, x_dim, layers=1, hidden=(500, 500), a_dim=100, z_dim=100,
                 likelihood="bernoulli", batchnorm=False, dtype="float32"):
        D, A, Z, H, L = x_dim, a_dim, z_dim, tuple(hidden), layers
        net = dict(batchnorm=batchnorm, dtype=dtype)
        self.x_dim, self.layers, self.likelihood, self.z_dim, self.dtype = x_dim, layers, likelihood, z_dim, dtype
        self.qa = [ad.Gaussian(D, H, A, **net)] + [ad.Gaussian((A, D), H, A, **net) for _ in range(L - 1)]
        self.qz = [ad.Gaussian((A, D), H, Z, **net)] + [ad.Gaussian((A, Z), H, Z, **net) for _ in range(L - 1)]
        self.pa = [ad.Gaussian((Z,) * (L - i), H, A, **net) for i in range(L)]       # p(a_i|z_{≥i})
        self.pz = [ad.Gaussian(Z, H, Z, **net) for _ in range(L - 1)]                # p(z_i|z_{i+1})
        self.px_net = ad.MLP(Z, H, **net)                                            # p(x|z_1)
        self.px_out = (ad.Linear(H[-1], D, dtype=dtype) if likelihood == "bernoulli"
                       else ad.GaussianHead(H[-1], D, dtype=dtype))
        self.noise = Noise()

    def log_weights(self, x, samples=1, temperature=1.0):
        """log p(x,a,z) − log q(a,z|x) for `samples` draws (S, B); T scales all but log p(x|z_1)."""
        a, z, log_q = [], [], 0.0
        for i in range(self.layers):
            mu, logvar = self.qa[i](x) if i == 0 else self.qa[i](a[-1], x)            # q(a_i|a_{i−1},x)
            eps = self.noise(f"a{i}", (samples,) + mu.shape[-2:], mu.dtype)
            a.append(sample_normal(mu, logvar, ad.Tensor(eps)))
            log_q = log_q + log_normal(a[-1], mu, logvar)
            mu, logvar = self.qz[i](a[-1], x) if i == 0 else self.qz[i](a[-1], z[-1])  # q(z_i|a_i,z_{i−1})
            eps = self.noise(f"z{i}", mu.shape, mu.dtype)
            z.append(sample_normal(mu, logvar, ad.Tensor(eps)))
            log_q = log_q + log_normal(z[-1], mu, logvar)
        log_p = log_standard_normal(z[-1])                                           # p(z_L)
        for i in range(self.layers):
            log_p = log_p + log_normal(a[i], *self.pa[i](*z[i:]))                    # p(a_i|z_{≥i})
            if i < self.layers - 1:
                log_p = log_p + log_normal(z[i], *self.pz[i](z[i + 1]))              # p(z_i|z_{i+1})
        h = self.px_net(z[0])
        log_px = (log_bernoulli(x, self.px_out(h)) if self.likelihood == "bernoulli"
                  else log_normal(x, *self.px_out(h)))                               # p(x|z_1)
        return log_px + temperature * (log_p - log_q)

    def generate(self, z):
        """Mean of p(x|z_1) with z_L = z (N, Z) and each lower z_i at the mean of p(z_i|z_{i+1})."""
        with ad.no_grad():
            z = ad.as_tensor(z, self.dtype)
            for i in reversed(range(self.layers - 1)):
                z = self.pz[i](z)[0]
            h = self.px_net(z)
            return ad.sigmoid(self.px_out(h)).data if self.likelihood == "bernoulli" else self.px_out(h)[0].data

    def loss(self, x, samples=1, temperature=1.0):
        """−(the auxiliary VAE bound of Eq. 2), averaged over examples and samples; device stats."""
        f = self.log_weights(ad.as_tensor(x, self.dtype), samples, temperature)
        loss = -f.mean()
        return loss, {"loss": loss.data, "bound": f.data.mean()}

    def log_likelihood(self, x, iw_samples=100, chunk=50):
        """Importance-weighted bound log (1/K) Σ_k p(x,a_k,z_k)/q(a_k,z_k|x) (B,)."""
        with ad.no_grad():
            x = ad.as_tensor(x, self.dtype)
            parts = [self.log_weights(x, min(chunk, iw_samples - s)).data for s in range(0, iw_samples, chunk)]
            return log_mean_exp(ad.Tensor(ad.xp.concatenate(parts, axis=0)), axis=0).data


# ---------------------------------------------------------------------------------------------
# The 2-D potential model (Sec. 4.1, Eq. 18)
# ---------------------------------------------------------------------------------------------

class PotentialModel(ad.Module):
    """Fit q to p(z) = exp(−U(z)) / Z by maximising, with q(a) a learned Gaussian (no input),
        log Z ≥ E_q(a)q(z|a)[ −U(z) + log p(a|z) − log q(a) − log q(z|a) ]           (Eq. 18)
    or, with auxiliary=False, the plain Gaussian bound E_q(z)[ −U(z) − log q(z) ]."""

    def __init__(self, potential, auxiliary=True, hidden=(20, 20, 20), a_dim=4, z_dim=2, dtype="float32"):
        self.U, self.auxiliary = potential, auxiliary
        n = a_dim if auxiliary else z_dim
        self.mu = ad.parameter(ad.rng.normal((n,), dtype))  # q(a) or q(z); off 0, where U₁ is a saddle
        self.logvar = ad.parameter(ad.xp.zeros(n, dtype=dtype))
        if auxiliary:
            # Glorot heads: with the authors' near-zero heads every z starts at the origin, a
            # saddle of the symmetric potentials that q(z|a) never leaves.
            self.qz_a = ad.Gaussian(a_dim, hidden, z_dim, head_std=None, dtype=dtype)  # q(z|a)
            self.pa_z = ad.Gaussian(z_dim, hidden, a_dim, head_std=None, dtype=dtype)  # p(a|z)
        self.noise = Noise()

    def _minus_U(self, z):
        return -self.U(z[..., 0], z[..., 1], ops=ad)

    def log_weights(self, samples):
        """−U(z) + log p(a|z) − log q(a) − log q(z|a) for `samples` draws (S,), and z (S, 2)."""
        eps = ad.Tensor(self.noise("q", (samples, self.mu.shape[0]), self.mu.dtype))
        v = sample_normal(self.mu, self.logvar, eps)
        log_q = log_normal(v, self.mu, self.logvar)                                  # q(a) or q(z)
        if not self.auxiliary:
            return self._minus_U(v) - log_q, v
        mu, logvar = self.qz_a(v)
        z = sample_normal(mu, logvar, ad.Tensor(self.noise("z", mu.shape, mu.dtype)))
        log_pa_z = log_normal(v, *self.pa_z(z))
        return self._minus_U(z) + log_pa_z - log_q - log_normal(z, mu, logvar), z  # the bound on log Z, Eq. 18

    def loss(self, samples=100):
        f, _ = self.log_weights(samples)
        loss = -f.mean()
        return loss, {"loss": loss.data, "bound": f.data.mean()}

    def log_z(self, iw_samples=1000):
        """Importance-weighted estimate of log Z (a tighter bound as iw_samples grows)."""
        with ad.no_grad():
            return log_mean_exp(self.log_weights(iw_samples)[0], axis=0).data

    def sample(self, n):
        with ad.no_grad():
            return self.log_weights(n)[1].data
