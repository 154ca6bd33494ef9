"""Tests of authors/models.py, the study of the authors' released code (docs/authors-code.md):
ADGMAuthors, the ADGM as the released code trains it (q(a|x) frozen, a in the classifier only,
closed-form a- and z-terms, the sample-averaged classifier in −U(x), the S > 1 indexing of
adgmssl.py:226), and the authors' averaging that study_class gives any semi-supervised model.

- q(a|x) stays bit-identical through training, and nothing reaches it in backward;
- the a-terms carry no gradient;
- both bounds against plain-NumPy formulas written from docs/authors-code.md;
- with S = 1 the sample-averaged −U(x) equals the per-sample form of the paper's models;
- authors_mixing: which examples' terms each example receives;
- study_class: the paper's class itself unless asked, the same subclass each time, the same
  parameters; QyAveraged and RowsAveraged against NumPy, and equal to the paper's forms where
  they must be.
"""
import json

import numpy as np
import pytest

import adgm
from authors import models as authors
import autodiff as ad
import datasets
from authors import data as authors_data
import train
from cli import options
from test_adgm import (A, K, Z, batch, fixed_noise, max_gradient_error, np_affine, np_gaussian, np_log_normal,
                       np_log_px, np_mlp, study, tiny)


def np_kl_standard(mu, logvar):
    """KL(N(μ, σ²) || N(0, I)), summed over the last axis."""
    return np.sum(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar), axis=-1)


def np_log_softmax(logits):
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_q_a_is_frozen_through_training_steps():
    model = tiny(authors.ADGMAuthors)
    frozen = {name: t.data.copy() for name, t in model.qa_x.named_tensors()}
    assert frozen and not any(t.requires_grad for _, t in model.qa_x.named_tensors())
    assert not [name for name in model.parameters() if name.startswith("qa_x")]
    opt = ad.Adam(model.parameters(), lr=1e-2, clip=5.0, clip_value=1.0)
    trained = {name: p.data.copy() for name, p in model.parameters().items()}
    x_l, y_l, x_u = batch()
    for _ in range(3):
        opt.zero_grad()
        model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 2)[0].backward()
        opt.step()
    for name, t in model.qa_x.named_tensors():
        assert t.grad is None, name
        np.testing.assert_array_equal(t.data, frozen[name], err_msg=name)
    moved = [name for name, p in model.parameters().items() if not np.array_equal(p.data, trained[name])]
    assert len(moved) == len(trained)  # everything else trains
    assert all(name.replace("qa_x.", "", 1) in model.qa_x.state_dict() for name in frozen)
    assert set(model.state_dict()) >= {"qa_x." + name for name in frozen}  # saved with the model


def test_a_terms_carry_no_gradient():
    model = tiny(authors.ADGMAuthors)
    x = ad.Tensor(batch()[2])
    q = model.draw([(x, K, "u")], 2)[0]
    f, t, _ = model.f(x, model._all_classes(), q)
    assert not t["kl_a"].requires_grad and not q.a.requires_grad and f.requires_grad
    assert t["kl_a"].shape == (4,) and (t["kl_a"].data > 0).all()
    assert "log_qa_x" not in t and "log_pa_zy" not in t                            # no log q(a|x), no p(a|·)


def _authors_forward(model, x, y1, eps_a, eps_z, T):
    """Plain NumPy, from docs/authors-code.md: f = log p(x|y,z) + log p(y) − T·(KL_z + KL_a) with
    closed-form KLs, and log q(y|a_s,x) (S, B, K), for one-hot rows y1 (B, C, K)."""
    mu_a, lv_a = np_gaussian(model.qa_x, x)                                          # frozen q(a|x)
    a = mu_a + np.exp(0.5 * lv_a) * eps_a                                            # (S, B, A)
    log_qy = np_log_softmax(np_affine(model.qy_logits, np_mlp(model.qy_ax, x, a)))   # q(y|a,x)
    mu_z, lv_z = np_gaussian(model.qz_axy, x[:, None], y1)                           # q(z|y,x), (B, C, Z)
    z = mu_z + np.exp(0.5 * lv_z) * eps_z                                            # (S, B, C, Z)
    log_px = np_log_px(model, x[:, None], np_mlp(model.px_net, z, y1))               # (S, B, C)
    kl = np_kl_standard(mu_z, lv_z) + np_kl_standard(mu_a, lv_a)[:, None]            # (B, C)
    return log_px - np.log(K) - T * kl, log_qy


@pytest.mark.parametrize("S", [1, 3])
def test_both_bounds_equal_an_independent_numpy_formula(S):
    T = 0.7
    model = tiny(authors.ADGMAuthors)
    x_l, y_l, x_u = batch()
    noise = fixed_noise(len(x_l), len(x_u), S)
    model.noise = adgm.Noise(noise)
    minus_L, log_qy_l, _, _ = model.labeled_bound(ad.Tensor(x_l), y_l, S, T)
    minus_U = model.unlabeled_bound(ad.Tensor(x_u), S, T)[0]

    f, log_qy = _authors_forward(model, x_l, np.eye(K)[y_l][:, None], noise["a_l"], noise["z_l"], T)
    np.testing.assert_allclose(minus_L.data, f.mean(axis=0)[:, 0], rtol=1e-12)
    np.testing.assert_allclose(log_qy_l.data, log_qy[:, np.arange(len(y_l)), y_l].mean(axis=0), rtol=1e-12)

    f, log_qy = _authors_forward(model, x_u, np.eye(K)[None], noise["a_u"], noise["z_u"], T)
    qbar = np.exp(log_qy).mean(axis=0) + 1e-8                                        # (B, K)
    qbar /= qbar.sum(axis=-1, keepdims=True)
    expected = (qbar * (f.mean(axis=0) - np.log(qbar))).sum(axis=-1)
    np.testing.assert_allclose(minus_U.data, expected, rtol=1e-12)


def test_importance_weights_are_those_of_p_y_p_z_p_x_given_y_z():
    """log_likelihood weighs z ~ q(z|y,x) by log p(x|y,z) + log p(y) + log p(z) − log q(z|y,x), each
    class; a is no part of its generative model, and the z-terms are Monte Carlo, not closed forms."""
    S = 3
    model = tiny(authors.ADGMAuthors)
    x = batch()[2]
    eps = np.random.default_rng(4).standard_normal((S, len(x), K, Z))
    y1 = np.eye(K)[None]                                                             # every class
    mu, lv = np_gaussian(model.qz_axy, x[:, None], y1)                                # q(z|y,x), (B, K, Z)
    z = mu + np.exp(0.5 * lv) * eps                                                  # (S, B, K, Z)
    expected = (np_log_px(model, x[:, None], np_mlp(model.px_net, z, y1)) - np.log(K)
                + np_log_normal(z, 0, 0) - np_log_normal(z, mu, lv))                  # (S, B, K)
    model.noise = adgm.Noise({"z_u": eps})
    np.testing.assert_allclose(model.log_weights(ad.Tensor(x), S).data, expected, rtol=1e-12)
    model.noise = adgm.Noise({"z_u": eps})
    log_px = np.logaddexp.reduce(np.logaddexp.reduce(expected, axis=-1), axis=0) - np.log(S)
    np.testing.assert_allclose(model.log_likelihood(x, S, chunk=S), log_px, rtol=1e-12)


@pytest.mark.parametrize("cls", [authors.ADGMAuthors, adgm.M2])
def test_rows_average_is_the_mean_over_all_rows(cls):
    """RowsAveraged (--loss-average rows): J is the mean of the B_l + B_u rows, where the paper's
    class adds the mean of each half."""
    model, plain = tiny(study(cls, loss_average="rows")), tiny(cls)
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), 1))
    minus_L, log_qy_l, _, _ = model.labeled_bound(ad.Tensor(x_l), y_l)
    minus_U = model.unlabeled_bound(ad.Tensor(x_u))[0]
    J = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5)[0]
    rows = np.concatenate([-minus_L.data - 2.5 * log_qy_l.data, -minus_U.data])
    np.testing.assert_allclose(J.data, rows.mean(), rtol=1e-12)
    plain.noise = model.noise
    halves = plain.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5)[0]
    np.testing.assert_allclose(halves.data, rows[:len(y_l)].mean() + rows[len(y_l):].mean(), rtol=1e-12)
    assert abs(float(halves.data) - float(J.data)) > 1e-3  # 3 + 4 rows: the two averages differ


def test_one_sample_averaged_form_equals_the_per_sample_form():
    """With S = 1, Σ_y q̄ (f̄ − log q̄) is the paper's E_a[Σ_y q (f − log q)] (the paper's
    unlabeled_bound on the same model and draws), up to the 1e-8 that the authors add to q̄;
    with S = 3 the two differ."""
    model = tiny(authors.ADGMAuthors)
    x = ad.Tensor(batch()[2])
    for S, differ in ((1, False), (3, True)):
        q = model.draw([(x, K, "u")], S)[0]
        averaged = model.unlabeled_bound(x, S, q=q)[0].data
        per_sample = adgm.SemiSupervised.unlabeled_bound(model, x, S, q=q)[0].data
        assert (np.abs(averaged - per_sample).max() > 1e-3) == differ, S
        if not differ:
            np.testing.assert_allclose(averaged, per_sample, atol=1e-6)


def test_authors_mixing_gives_each_example_the_terms_of_other_examples():
    """adgmssl.py:226 with S = 2 and a batch of 4: example b's class-c term is the mean over the
    examples (s·4 + b) // 2, s = 0, 1, at their samples (s·4 + b) % 2: example 0 gets sample 0 of
    examples 0 and 2, example 1 sample 1 of 0 and 2, examples 2 and 3 samples 0 and 1 of 1 and 3."""
    S, B = 2, 4
    f = np.zeros((S, B, K))
    for s in range(S):
        for e in range(B):
            f[s, e] = 10 * e + s                                                     # which example, which sample
    mixed = authors.authors_mixing(ad.Tensor(f)).data                                   # (B, K)
    expected = [np.mean([10 * ((s * B + b) // S) + (s * B + b) % S for s in range(S)]) for b in range(B)]
    np.testing.assert_array_equal(mixed[:, 0], expected)
    np.testing.assert_array_equal(mixed[:, 0], [10.0, 11.0, 20.0, 21.0])             # (0,0)(2,0) | (0,1)(2,1) | …
    np.testing.assert_array_equal(authors.authors_mixing(ad.Tensor(f[:1])).data, f[0])  # S = 1: exact


def test_authors_indexing_changes_only_multi_sample_bounds():
    x_u = ad.Tensor(batch()[2])
    for S, differs in ((1, False), (2, True)):
        values = []
        for indexing in (False, True):
            model = tiny(study(authors.ADGMAuthors, authors_order=indexing))
            assert model.authors_indexing == indexing
            model.noise = adgm.Noise(fixed_noise(3, 4, S))
            values.append(model.unlabeled_bound(x_u, S)[0].data)
        assert (np.abs(values[0] - values[1]).max() > 1e-6) == differs, S


def test_deterministic_twin_uses_the_mean_of_the_same_frozen_network():
    model = tiny(authors.ADGMAuthorsDeterministic)
    x = batch()[2]
    a, mu, _ = model._sample_a(ad.Tensor(x), 3)
    assert a.shape == (1, 4, A)
    np.testing.assert_array_equal(a.data[0], mu.data)
    np.testing.assert_array_equal(a.data[0], np_gaussian(model.qa_x, x)[0])
    assert not [name for name in model.parameters() if name.startswith("qa_x")]
    terms = model.unlabeled_bound(ad.Tensor(x), 2)[2]
    assert set(terms) == {"log_qz_axy", "log_pz", "log_py", "log_px", "f", "log_qy_ax"}
    assert model.qz_axy.net.layers[0].weight[0].shape[0] == batch()[2].shape[1]  # q(z|y,x): x, then y
    assert len(model.qz_axy.net.layers[0].weight) == 2 and model.pa_zy is None


def test_initialisation_follows_lasagne_per_input():
    """Glorot per DenseLayer in the authors' code: each input of a split first layer has its
    own fan-in; biases ~ N(0, 10⁻⁶)."""
    ad.rng.reseed(0)
    model = authors.ADGMAuthors(400, 10, (500, 500), 100, 100)
    w_x, w_a = model.qy_ax.layers[0].weight
    np.testing.assert_allclose(w_x.data.std(), np.sqrt(2) * np.sqrt(2 / 900), rtol=0.02)
    np.testing.assert_allclose(w_a.data.std(), np.sqrt(2) * np.sqrt(2 / 600), rtol=0.02)
    limit = np.sqrt(6 / 510)                                                         # Glorot-uniform softmax
    assert np.abs(model.qy_logits.weight[0].data).max() <= limit
    assert np.abs(model.qy_logits.weight[0].data).max() > 0.95 * limit
    mu_head = model.qz_axy.head.mu.weight[0]
    np.testing.assert_allclose(mu_head.data.std(), np.sqrt(2 / 600), rtol=0.02)      # gain 1, not 1e-3
    np.testing.assert_allclose(model.px_net.layers[1].bias.data.std(), 1e-3, rtol=0.2)


# ---------------------------------------------------------------------------------------------
# study_class: the authors' averaging for any semi-supervised model
# ---------------------------------------------------------------------------------------------

def test_study_class_is_the_paper_s_class_unless_asked_and_the_same_class_each_time():
    paper = dict(qy_average=False, loss_average="halves", authors_order=False)
    for cls in (adgm.ADGM, adgm.SDGM, adgm.M2, adgm.ADGMDeterministic, authors.ADGMAuthors):
        assert authors.study_class(cls, paper) is cls
        assert authors.study_class(cls, dict(paper, authors_order=True)) is (
            cls if not issubclass(cls, authors.ADGMAuthors) else study(cls, authors_order=True))
    assert not authors.ADGMAuthors.authors_indexing and study(authors.ADGMAuthors, authors_order=True).authors_indexing
    both = study(adgm.SDGM, qy_average=True, loss_average="rows")
    assert both is study(adgm.SDGM, qy_average=True, loss_average="rows") and issubclass(both, adgm.SDGM)
    assert both.draw is authors.QyAveraged.draw and both.objective is authors.RowsAveraged.objective
    assert study(adgm.SDGM, qy_average=True) is not both
    # the same networks under the same names: checkpoints of either load into the other
    assert tiny(both).state_dict().keys() == tiny(adgm.SDGM).state_dict().keys()
    for name, p in tiny(both).state_dict().items():
        np.testing.assert_array_equal(p, tiny(adgm.SDGM).state_dict()[name], err_msg=name)
    with pytest.raises(AssertionError):
        authors.study_class(adgm.ADGM, dict(paper, loss_average="mean"))
    with pytest.raises(ValueError):  # its −U(x) averages q(y|a,x) in its own way
        authors.study_class(authors.ADGMAuthors, dict(paper, qy_average=True))


@pytest.mark.parametrize("cls", [adgm.ADGM, adgm.SDGM])
def test_the_classifier_averaged_over_samples(cls):
    """QyAveraged (--qy-average): −U(x) = Σ_y q̄(y|x)(f̄ − log q̄(y|x)) with q̄ = mean_s q(y|a_s,x),
    and the classification term log mean_s q(y_l|a_s,x), against plain NumPy on the same draws;
    at S = 1 the paper's J, number for number; dJ/dθ against central differences."""
    S, T = 3, 0.7
    model = tiny(study(cls, qy_average=True))
    x_l, y_l, x_u = batch()
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
    minus_U = model.unlabeled_bound(ad.Tensor(x_u), S, T)[0]
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
    q = model.draw([(ad.Tensor(x_u), K, "u")], S)[0]
    assert q.log_qy_ax.shape == (1, len(x_u), K)
    f = model.f(ad.Tensor(x_u), model._all_classes(), q, T)[0].data                   # (S, B, K)
    qy = np.exp(model.log_qy(ad.Tensor(x_u), q.a).data).mean(axis=0)                 # q̄ (B, K)
    np.testing.assert_allclose(minus_U.data, (qy * (f.mean(axis=0) - np.log(qy))).sum(-1), rtol=1e-12)
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
    _, log_qy_label, _, _ = model.labeled_bound(ad.Tensor(x_l), y_l, S, T)
    model.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), S))
    a_l = model.draw([(ad.Tensor(x_l), 1, "l")], S)[0].a
    q_l = np.exp(model.log_qy(ad.Tensor(x_l), a_l).data)[:, np.arange(len(y_l)), y_l]  # (S, B_l)
    np.testing.assert_allclose(log_qy_label.data, np.log(q_l.mean(axis=0)), rtol=1e-12)
    assert not np.allclose(log_qy_label.data, np.log(q_l).mean(axis=0))           # not the per-sample mean
    plain = tiny(cls)
    for m in (model, plain):
        m.noise = adgm.Noise(fixed_noise(len(y_l), len(x_u), 1))
    J1 = [float(m.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, 1, T)[0].data) for m in (model, plain)]
    assert J1[0] == J1[1]
    model.noise = adgm.Noise(fixed_noise(len(x_l), len(x_u), S))
    args = (ad.Tensor(x_l), y_l, ad.Tensor(x_u), 2.5, S, T)
    error, where = max_gradient_error(model, lambda: model.loss(*args)[0])
    assert error < 1e-6, where


# ---------------------------------------------------------------------------------------------
# train.py: the model's defaults, its options on other models, the authors' data order
# ---------------------------------------------------------------------------------------------

def test_command_line_defaults_of_adgm_authors_and_the_same_settings_for_m2(tmp_path, data_dir):
    from test_train import MNIST, ok, run
    ok(run(*MNIST, "--model", "adgm-authors", "--epochs", "1", "--data-dir", data_dir, "--out", tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: config[k] for k in options.AUTHORS} == options.AUTHORS
    with np.load(tmp_path / "a" / "checkpoint.npz") as z:
        assert z["param/qy_ax.layers.0.weight.0"].shape[0] == 784   # all pixels
    m2 = ["--model", "m2", "--beta", "2", "--loss-average", "rows", "--clip-value", "1", "--weight-prior", "1",
          "--pixels", "all"]
    ok(run(*MNIST, *m2, "--epochs", "1", "--data-dir", data_dir, "--out", tmp_path / "m2"))
    config = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert {k: config[k] for k in options.AUTHORS} == options.AUTHORS
    ok(run(*MNIST, "--model", "m2", "--epochs", "1", "--data-dir", data_dir, "--out", tmp_path / "plain"))
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert {k: config[k] for k in options.COMMON} == options.COMMON


def test_weight_prior_is_divided_by_the_rows_of_an_epoch():
    config = dict(options.COMMON, weight_prior=2.0, lr=1e-3, clip=5.0, clip_value=1.0)
    model = tiny(authors.ADGMAuthors)
    opt = train.build_optimizer(config, model, rows_per_epoch=1000)
    assert opt.decay == pytest.approx(1 / (4 * 1000)) and opt.clip_value == 1.0
    weights = {id(w) for m in model.modules() if isinstance(m, ad.Linear) for w in m.weight if w.requires_grad}
    assert {id(p) for p in opt.decayed} == weights and len(weights) > 0
    assert not any(id(t) in weights for _, t in model.qa_x.named_tensors())   # frozen: no prior
    assert train.build_optimizer(dict(config, weight_prior=0.0), model, 1000).decay == 0.0


def test_authors_order_walks_the_unlabeled_set_sorted_by_class_and_never_reshuffles():
    gen = np.random.default_rng(0)
    y = gen.integers(0, 3, 24)
    x = np.arange(24, dtype=np.float32)[:, None].repeat(2, axis=1)                 # row i holds i
    data = datasets.Dataset("tiny", x[:3], y[:3], x, y, x[:6], y[:6], n_classes=3, likelihood="gaussian",
                            binarize=False)
    walks = []
    for authors_order in (True, False):
        batches = datasets.Batches(data, 3, 6, authors_data.class_order(data) if authors_order else None)
        walks.append([np.concatenate([b[2][:, 0] for b in batches.epoch()]).astype(int) for _ in range(2)])
    (first, second), (shuffled, reshuffled) = walks
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, np.argsort(y, kind="stable"))
    assert (np.diff(y[first]) >= 0).all()
    assert not np.array_equal(shuffled, reshuffled)


def test_labeled_images_are_binarised_anew_at_every_step():
    x = np.full((40, 50), 0.5, np.float32)
    y = np.arange(40) % 2
    data = datasets.Dataset("tiny", x[:2], y[:2], x, y, x[:4], y[:4], n_classes=2, likelihood="bernoulli",
                            binarize=True)
    labeled = [b[0] for b in datasets.Batches(data, 2, 10).epoch()]
    assert len(labeled) == 4 and not np.array_equal(labeled[0], labeled[1])


def test_a_run_folder_without_the_common_options_resumes_with_their_defaults(tmp_path, data_dir):
    """A config.json and checkpoint that store none of options.COMMON (the options a stored
    configuration may lack, such as those that carry the authors' settings): --resume takes
    their defaults and trains on."""
    from test_train import MOONS, ok, run
    ok(run(*MOONS, "--epochs", "1", "--out", tmp_path / "old"))
    stored = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in options.COMMON:
        del stored[key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
    with np.load(tmp_path / "old" / "checkpoint.npz") as z:  # --resume reads the checkpoint's copy
        arrays = {k: z[k] for k in z.files}
    arrays["config"] = np.asarray(json.dumps(stored))
    with open(tmp_path / "old" / "checkpoint.npz", "wb") as f:
        np.savez(f, **arrays)
    ok(run("--resume", "--out", tmp_path / "old", "--epochs", "2"))
    ok(run("--evaluate", tmp_path / "old"))
