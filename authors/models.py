"""The authors' released code as a study of its own: its ADGM, another model than the paper's
equations, and the two ways its code averages that train.py offers for the paper's models too,
all built on the paper's classes in adgm.py without those classes carrying switches for them.
docs/authors-code.md says what the released code does, at its file:line, and what the runs of
this study show.

    ADGMAuthors               M2 whose classifier also sees a, a frozen random projection of x
    ADGMAuthorsDeterministic  the same with a = μ(x)
    authors_mixing            the released code's reshape of f over samples (S > 1)
    QyAveraged, RowsAveraged  the authors' averaging of q(y|a,x) and of J, for any semi-supervised model
    study_class               the class train.py builds for a configuration: the paper's, or with them
"""
import math

import autodiff as ad
from adgm import SemiSupervised, log_mean_exp, log_normal, log_standard_normal, sample_normal


# ---------------------------------------------------------------------------------------------
# The released code's ADGM
# ---------------------------------------------------------------------------------------------

class ADGMAuthors(SemiSupervised):
    """The ADGM as the authors' released code trains it (docs/authors-code.md): another
    model than the paper's equations. It is M2 whose classifier also sees a, a random,
    never-trained stochastic projection of x. Its bound, with y one-hot or every class:
        f = log p(x|y,z) + log p(y) − T·(KL(q(z|y,x) || p(z)) + KL(q(a|x) || N(0, I)))
        −L(x,y) = mean_s f,   −U(x) = Σ_y q̄(y|x) (mean_s f − log q̄(y|x)),  q̄ = mean_s q(y|a_s,x).
    Each difference from ADGM, at the line of adgmssl.py that makes it (docs/authors-code.md):
    - q(a|x) is frozen at its initialisation (:171 slices its parameters out of the optimizer's);
    - a feeds only q(y|a,x) (:77-89); q(z|y,x) does not see it (:93-98);
    - no p(a|z,y): the a-terms are the closed forms E_q[log N(a; 0, I)] and −H[q(a|x)], constants
      of the data, and the z-terms closed forms too (:187-190); T_a does not enter;
    - −U(x) sums over y under the classifier averaged over the samples of a (:226-233);
    - Lasagne's initialisation (:66-120): Glorot per input, Glorot-uniform softmax, biases 10⁻³.
    authors_indexing reproduces the S > 1 reshape of :226 (a diagnostic, see authors_mixing;
    study_class sets it for --authors-order).
    """
    authors_indexing = False

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._init_as_authors()
        for t in self.qa_x.parameters().values():
            t.requires_grad = False                                                  # adgmssl.py:171

    def _networks(self, D, K, A, Z, H, net):
        """q(a|x), q(y|a,x), q(z|y,x) and p(x|y,z) (adgmssl.py:66-120), and no p(a|z,y). q(z|y,x)
        keeps the name qz_axy of the paper's models, so checkpoints read the same way."""
        self.qa_x = ad.Gaussian(D, H, A, **net)                                      # q(a|x), frozen in __init__
        self.qy_ax = ad.MLP((D, A), H, **net)                                        # q(y|a,x)
        self.qy_logits = ad.Linear(H[-1], K, dtype=self.dtype)
        self.qz_axy = ad.Gaussian((D, K), H, Z, **net)                               # q(z|y,x)
        self.pa_zy = None
        self.px_net = ad.MLP((Z, K), H, **net)                                       # p(x|y,z)
        self.px_out = (ad.Linear(H[-1], D, dtype=self.dtype) if self.likelihood == "bernoulli"
                       else ad.GaussianHead(H[-1], D, dtype=self.dtype))

    def _init_as_authors(self):
        relu = math.sqrt(2.0)
        hidden = {id(layer) for net in (self.qa_x.net, self.qy_ax, self.qz_axy.net, self.px_net)
                  for layer in net.layers}
        uniform = {id(self.qy_ax.layers[-1]), id(self.qy_logits)}                    # GlorotUniform (:86-88)
        for m in self.modules():
            if not isinstance(m, ad.Linear):
                continue
            gain = relu if id(m) in hidden else 1.0
            for w in m.weight:                           # one DenseLayer per input: its own fan-in
                std = gain * math.sqrt(2.0 / sum(w.shape))
                w.data[...] = (ad.rng.normal(w.shape, w.dtype) * std if id(m) not in uniform else
                               (ad.rng.uniform(w.shape, w.dtype) * 2 - 1) * (std * math.sqrt(3.0)))
            m.bias.data[...] = ad.rng.normal(m.bias.shape, m.bias.dtype) * 1e-3

    def _qz(self, xb, ab, y):
        return self.qz_axy(xb, y)                                                    # q(z|y,x): a is no input

    def f(self, x, y, q, temperature=1.0, temperature_a=1.0):
        """f = log p(x|y,z) + log p(y) − T·(KL_z + KL_a) (S, B, C), with the draws q (a serves q(y|a,x)
        alone): log p(x|y,z) by Monte Carlo (z ~ q(z|y,x)), the rest in closed form (adgmssl.py:187-190),
        the terms log_qz_axy = E_q log q(z|y,x), log_pz = E_q log p(z) (B, C) and kl_a (B,) (none for
        a = μ). Returns f, its terms and KL_z + KL_a; T_a does not enter."""
        xb = x.reshape(x.shape[0], 1, self.x_dim)                                    # (B, 1, D)
        mu, logvar = q.qa                                                            # q(a|x): (B, A)
        t = {}
        if self.auxiliary == "stochastic":
            t["kl_a"] = (0.5 * (mu * mu + ad.exp(logvar) - 1 - logvar)).sum(axis=-1)  # KL(q(a|x) || N(0, I))
        mu, logvar = self.qz_axy(xb, y)                                              # q(z|y,x): (B, C, Z)
        z = sample_normal(mu, logvar, q.eps_z)                                       # (S, B, C, Z)
        t["log_qz_axy"] = (-0.5 * (ad.LOG_2PI + 1 + logvar)).sum(axis=-1)            # E_q log q(z|y,x)
        t["log_pz"] = (-0.5 * (ad.LOG_2PI + mu * mu + ad.exp(logvar))).sum(axis=-1)  # E_q log N(z; 0, I)
        t["log_py"] = -math.log(self.n_classes)                                      # p(y) uniform
        t["log_px"] = self._log_px(xb, self.px_net(z, y))                            # p(x|y,z): (S, B, C)
        kl = t["log_qz_axy"] - t["log_pz"]                                           # KL_z: (B, C)
        if "kl_a" in t:
            kl = kl + t["kl_a"].reshape(-1, 1)
        return t["log_px"] + t["log_py"] - temperature * kl, t, kl

    def unlabeled_bound(self, x, samples=1, temperature=1.0, temperature_a=1.0, q=None):
        """−U(x) = Σ_y q̄(y|x) (f̄(x,y) − log q̄(y|x)) (B,) with q̄ = mean_s q(y|a_s,x) (+1e-8,
        renormalised) and f̄ the mean of f over samples (adgmssl.py:226-233), or with
        authors_indexing their S > 1 reshape of f (authors_mixing); also q̄ (1, B, K), the terms
        of f with f itself and log_qy_ax = log q̄, and the KL part. q: the draws of x, if made."""
        x = ad.as_tensor(x, self.dtype)
        q = q or self.draw([(x, self.n_classes, "u")], samples)[0]
        f, t, kl = self.f(x, self._all_classes(), q, temperature)                    # f (S, B, K)
        qy = ad.exp(q.log_qy_ax).mean(axis=0) + 1e-8                                 # q̄(y|x): (B, K)
        qy = qy / qy.sum(axis=-1, keepdims=True)
        log_qy = ad.log(qy)
        f_mean = authors_mixing(f) if self.authors_indexing else f.mean(axis=0)      # f̄: (B, K)
        minus_U = (qy * (f_mean - log_qy)).sum(axis=-1)
        t.update(f=f, log_qy_ax=log_qy.reshape(1, *qy.shape))
        return minus_U, qy.reshape(1, *qy.shape), t, kl

    def log_weights(self, x, samples):
        """log p(x,y,z) − log q(z|y,x) (S, B, K) for every class, z ~ q(z|y,x): the importance
        weights of its generative model p(y) p(z) p(x|y,z), which a is no part of, with the
        z-terms by Monte Carlo (the closed forms of its bound are not weights)."""
        B, y = x.shape[0], self._all_classes()
        xb = x.reshape(B, 1, self.x_dim)                                             # (B, 1, D)
        mu, logvar = self.qz_axy(xb, y)                                              # q(z|y,x): (B, K, Z)
        z = sample_normal(mu, logvar, ad.Tensor(self.noise("z_u", (samples,) + mu.shape, mu.dtype)))
        log_qz_xy, log_pz = log_normal(z, mu, logvar), log_standard_normal(z)        # (S, B, K)
        log_px, log_py = self._log_px(xb, self.px_net(z, y)), -math.log(self.n_classes)
        return log_px + log_py - (log_qz_xy - log_pz)


def authors_mixing(f):
    """f (S, B, K) averaged over samples as adgmssl.py:226 does it: its rows are ordered
    (class, example, sample) but reshaped as (class, sample, example), so with S > 1 example b
    receives the terms of examples (s·B + b) // S for s < S — other examples of its batch.
    With S = 1 this is f[0]."""
    S, B, K = f.shape
    return f.transpose((2, 1, 0)).reshape(K, S, B).mean(axis=1).transpose((1, 0))  # (B, K)


class ADGMAuthorsDeterministic(ADGMAuthors):
    """The third curve of the authors' figure: a = μ(x) of the same frozen q(a|x), no a-terms."""
    auxiliary = "deterministic"


# The released code's training settings, the defaults of its models (train.py's options of the
# same names): β = 2, the loss averaged over all rows of a batch, each gradient clipped to ±1, a
# N(0, 1) prior on the weights, all 784 pixels (docs/authors-code.md).
SETTINGS = dict(beta=2.0, loss_average="rows", clip_value=1.0, weight_prior=1.0, pixels="all")


# ---------------------------------------------------------------------------------------------
# The authors' averaging, for any semi-supervised model (train.py's --qy-average, --loss-average)
# ---------------------------------------------------------------------------------------------

class QyAveraged:
    """q(y|a,x) averaged over the S samples of a before the bounds use it, as the authors' SDGM
    code does (docs/authors-code.md: density_layers.py:98-105, sdgmssl.py:248-249, :280-285),
    where Eq. 17 averages the per-sample terms: the draws carry log q̄(y|x), q̄ = mean_s q(y|a_s,x),
    so the classification term is log q̄(y_l|x_l), and −U(x) = Σ_y q̄(y|x) (f̄ − log q̄(y|x)) with
    f̄ the mean of f over samples. The same as the paper's forms at S = 1."""

    def draw(self, halves, samples, classifier=True):
        return [q if q.log_qy_ax is None else q._replace(log_qy_ax=log_mean_exp(q.log_qy_ax, axis=0, keepdims=True))
                for q in super().draw(halves, samples, classifier)]                  # log q̄(y|x): (1, B, K)

    def unlabeled_bound(self, x, samples=1, temperature=1.0, temperature_a=1.0, q=None):
        """−U(x) = Σ_y q̄(y|x) (f̄ − log q̄(y|x)) (B,), and the rest as the paper's unlabeled_bound."""
        x = ad.as_tensor(x, self.dtype)
        q = q or self.draw([(x, self.n_classes, "u")], samples)[0]
        f, t, kl = self.f(x, self._all_classes(), q, temperature, temperature_a)     # f (S, B, K)
        qy = ad.exp(q.log_qy_ax)                                                     # q̄(y|x): (1, B, K)
        minus_U = (qy * (ad.mean(f, axis=0, keepdims=True) - q.log_qy_ax)).sum(axis=-1).mean(axis=0)
        t.update(f=f, log_qy_ax=q.log_qy_ax)
        return minus_U, qy, t, kl


class RowsAveraged:
    """J the mean over all B_l + B_u rows of a batch, as the released ADGM code takes it
    (docs/authors-code.md: adgmssl.py:253-265), where the paper's models add the mean of each half."""

    def objective(self, L_l, U):
        return (L_l.sum() + U.sum()) * (1.0 / (L_l.shape[0] + U.shape[0]))


_STUDIES = {}  # (class, averaging, indexing): the subclass study_class made for them


def study_class(cls, config):
    """The class train.py builds for a --model of class cls: cls itself when the configuration
    keeps the paper's averaging (qy_average False, loss_average 'halves') and, for the
    ADGMAuthors classes, the correct indexing (authors_order False); else the subclass of cls
    with QyAveraged, RowsAveraged and authors_indexing as it asks, the same class each time.
    (train.py refuses --qy-average for the ADGMAuthors classes, and so does this.)"""
    assert config["loss_average"] in ("halves", "rows"), config["loss_average"]
    if config["qy_average"] and issubclass(cls, ADGMAuthors):
        raise ValueError("qy_average: the released ADGM's −U(x) averages q(y|a,x) in its own way already")
    averaging = tuple(m for m, asked in ((QyAveraged, config["qy_average"]),
                                         (RowsAveraged, config["loss_average"] == "rows")) if asked)
    indexing = issubclass(cls, ADGMAuthors) and bool(config["authors_order"])
    if not averaging and not indexing:
        return cls
    key = (cls, averaging, indexing)
    if key not in _STUDIES:
        name = cls.__name__ + "".join(m.__name__ for m in averaging) + ("Indexed" if indexing else "")
        _STUDIES[key] = type(name, averaging + (cls,), {"authors_indexing": True} if indexing else {})
    return _STUDIES[key]
