"""The models train.py trains, declared once: MODELS, the one table that gives every --model its
class and its kind; and for each kind, how its network is built from a configuration, the
objective of one training step, its test metrics and the figures figures/draw.py draws of it
(KINDS). kind_of(config) picks a run's.

    semi-supervised   the ADGM, SDGM, M2 and their variants: labels, α = β·N/N_l
    avae              the auxiliary VAE of Sec. 4.3 (Eq. 19-20), measured on binary test images
    potential         --dataset potential: q(a)q(z|a) or a plain Gaussian q(z) fitted to exp(-U(z))
"""
from typing import Callable, NamedTuple

import numpy as np

import adgm
from authors import models as authors
import autodiff as ad
import datasets
from figures import draw
from cli.progress import counted


# ---------------------------------------------------------------------------------------------
# The models: every --model, its class and its kind, declared once
# ---------------------------------------------------------------------------------------------

class Model(NamedTuple):
    """A --model: the class it builds, its kind (KINDS: how it is built, stepped, measured and
    drawn), the options of ONLY_SOME it takes, and defaults that go over the data set's."""
    cls: type
    kind: str
    takes: tuple = ()
    defaults: dict = {}


# Options that apply to some models only, with what each one does. Set to anything but its
# default for a model that does not take it, it is refused (it would be ignored).
ONLY_SOME = {
    "x_in_pa": ("gives x to p(a|z,y), as Eq. 5 writes it", False),
    "temperature_a": ("weighs the terms of a stochastic a and its p(a|z,y)", 1.0),
    "qy_average": ("averages q(y|a,x) over the samples of a trained q(a|x)", False),
    "eval_train": ("measures the classifier on the unlabeled training images", False),
    "layers": ("sets the stochastic layers of the auxiliary VAE", 1),
    "batchnorm": ("normalises the hidden layers over a batch of data", False),
    "authors_order": ("orders the unlabeled examples of a data set", False),
}
DATA = ("batchnorm", "authors_order")  # what every model of a data set takes
SEMI = DATA + ("eval_train",)          # what every semi-supervised model takes
MODELS = {
    "adgm": Model(adgm.ADGM, "semi-supervised", SEMI + ("x_in_pa", "temperature_a", "qy_average")),
    "sdgm": Model(adgm.SDGM, "semi-supervised", SEMI + ("temperature_a", "qy_average")),  # no x_in_pa: a comes before x
    "m2": Model(adgm.M2, "semi-supervised", SEMI),
    "adgm-det": Model(adgm.ADGMDeterministic, "semi-supervised", SEMI),
    "adgm-authors": Model(authors.ADGMAuthors, "semi-supervised", SEMI, authors.SETTINGS),
    "adgm-authors-det": Model(authors.ADGMAuthorsDeterministic, "semi-supervised", SEMI, authors.SETTINGS),
    # Table 1's log-likelihoods are of all 784 pixels (permutation-invariant MNIST)
    "avae": Model(adgm.AuxiliaryVAE, "avae", DATA + ("layers",), dict(pixels="all")),
    "gauss": Model(adgm.PotentialModel, "potential"),
}
POTENTIAL = Model(adgm.PotentialModel, "potential")  # --dataset potential: avae is q(a)q(z|a), gauss a plain q(z)


def model_of(config):
    """The Model of a configuration's --model on its --dataset."""
    return POTENTIAL if config["dataset"] == "potential" else MODELS[config["model"]]


# ---------------------------------------------------------------------------------------------
# What train.py needs of each kind
# ---------------------------------------------------------------------------------------------

class Kind(NamedTuple):
    """What train.py does with one kind of model."""
    network: Callable   # (config, data) -> the model
    loss: Callable      # (model, batch, config, alpha, temperature) -> (J, stats): one step's objective
    metrics: Callable   # (model, data, config, final) -> {name: host float}: the test metrics
    figures: Callable   # (model, data, config, folder, rows): figures/draw.py's drawing of the run
    labeled: bool       # learns from labels, with α = β·N/N_l
    binary_test: bool   # measured on binary test images (one fixed binarisation)


# ---------------------------------------------------------------------------------------------
# Semi-supervised: the ADGM, the SDGM, M2 and their variants (Sec. 2.3-2.4)
# ---------------------------------------------------------------------------------------------

def semi_supervised_network(config, data):
    (a_dim, z_dim), hidden = config["latent"], config["hidden"]
    cls = authors.study_class(model_of(config).cls, config)  # the paper's class, or with the authors' averaging
    return cls(data.x_unlabeled.shape[1], data.n_classes, hidden, a_dim, z_dim, data.likelihood,
               x_in_pa=config["x_in_pa"], batchnorm=config["batchnorm"])


def semi_supervised_loss(model, batch, config, alpha, temperature):
    x_l, y_l, x_u = batch
    return model.loss(x_l, y_l, x_u, alpha, config["samples"], temperature, config["temperature_a"])


KL_UNITS_IMAGES = 500  # test images behind the per-unit KL of a logged each epoch


def semi_supervised_metrics(model, data, config, final):
    """Test error of q(y|a,x) and of the Bayes classifier (in %), the test bound, the KL of each
    unit of a (kl_a_1, ...; Fig. 4a's measure of which units are in use), with --eval-train the
    error on the unlabeled training images, and at the end the importance-weighted
    log-likelihood when --iw-samples asks for it, with its standard error."""
    x_test, y_test = data.x_test, data.y_test
    preds, bayes, bounds = [], [], []
    for i in range(0, len(x_test), 500):
        p, b, u = model.evaluate(ad.xp.asarray(x_test[i:i + 500]), samples=config["eval_samples"])
        preds.append(ad.to_numpy(p)), bayes.append(ad.to_numpy(b)), bounds.append(ad.to_numpy(u))
    row = {"test_error_pct": 100 * float(np.mean(np.concatenate(preds) != y_test)),
           "test_error_bayes_pct": 100 * float(np.mean(np.concatenate(bayes) != y_test)),
           "test_bound": float(np.concatenate(bounds).mean())}
    if config["eval_train"]:
        x, y = data.x_unlabeled, data.y_unlabeled
        preds = [ad.to_numpy(model.predict(ad.xp.asarray(x[i:i + 500]), samples=config["eval_samples"]))
                 for i in range(0, len(x), 500)]
        row["train_error_pct"] = 100 * float(np.mean(np.concatenate(preds) != y))
    if model.pa_zy is not None:
        kl_a = ad.to_numpy(model.kl_per_unit(ad.xp.asarray(x_test[:KL_UNITS_IMAGES]))[0])
        row.update({f"kl_a_{i + 1}": float(f"{v:.5g}") for i, v in enumerate(kl_a)})
    if final and config["iw_samples"]:
        n = config["eval_images"] or len(x_test)
        lls = [ad.to_numpy(model.log_likelihood(ad.xp.asarray(x_test[i:min(i + 100, n)]), config["iw_samples"]))
               for i in counted(n, 100, f"IW-{config['iw_samples']} bound")]
        row.update(mean_and_error(f"test_ll_iw{config['iw_samples']}", np.concatenate(lls)))
    return row


def mean_and_error(name, values):
    """The mean of per-image estimates and, where there are two or more, its standard error."""
    row = {name: float(values.mean())}
    if len(values) > 1:
        row[name + "_se"] = float(values.std(ddof=1) / np.sqrt(len(values)))
    return row


# ---------------------------------------------------------------------------------------------
# The auxiliary VAE with L stochastic layers (Sec. 4.3, Eq. 19-20)
# ---------------------------------------------------------------------------------------------

def avae_network(config, data):
    (a_dim, z_dim), hidden = config["latent"], config["hidden"]
    return adgm.AuxiliaryVAE(data.x_unlabeled.shape[1], config["layers"], hidden, a_dim, z_dim, data.likelihood,
                             config["batchnorm"])


def avae_loss(model, batch, config, alpha, temperature):
    return model.loss(batch[2], config["samples"], temperature)  # the unlabeled examples


def avae_metrics(model, data, config, final):
    """The test bound, or at the end the importance-weighted bound when --iw-samples asks for it,
    with its standard error over the test images."""
    x_test = data.x_test
    n = config["eval_images"] or len(x_test)
    k = config["iw_samples"] if final and config["iw_samples"] else 1
    starts = counted(n, 500, f"IW-{k} bound") if k > 1 else range(0, n, 500)
    lls = np.concatenate([ad.to_numpy(model.log_likelihood(ad.xp.asarray(x_test[i:min(i + 500, n)]), k))
                          for i in starts])
    return {"test_bound": float(lls.mean())} if k == 1 else mean_and_error(f"test_ll_iw{k}", lls)


# ---------------------------------------------------------------------------------------------
# The potentials of Sec. 4.1
# ---------------------------------------------------------------------------------------------

def potential_network(config, data):
    (a_dim, z_dim), hidden = config["latent"], config["hidden"]
    return adgm.PotentialModel(datasets.POTENTIALS[config["potential"]], auxiliary=config["model"] == "avae",
                               hidden=hidden, a_dim=a_dim, z_dim=z_dim)  # gauss: a plain Gaussian q(z)


def potential_loss(model, batch, config, alpha, temperature):
    return model.loss(config["batch_size"])  # fresh samples of z, no data


def potential_metrics(model, data, config, final):
    """The bound (Eq. 18) from 10⁵ samples, IW-1000 averaged over 20, and the true log Z."""
    with ad.no_grad():
        bound = np.mean([float(model.log_weights(10_000)[0].data.mean()) for _ in range(10)])
    return {"test_bound": bound, "log_z_iw": float(np.mean([float(model.log_z(1000)) for _ in range(20)])),
            "log_z_true": datasets.log_z(config["potential"])}


# ---------------------------------------------------------------------------------------------
# The table: every kind of MODELS
# ---------------------------------------------------------------------------------------------

KINDS = {
    "semi-supervised": Kind(semi_supervised_network, semi_supervised_loss, semi_supervised_metrics,
                            draw.semi_supervised_figures, labeled=True, binary_test=False),
    "avae": Kind(avae_network, avae_loss, avae_metrics, draw.avae_figures, labeled=False, binary_test=True),
    "potential": Kind(potential_network, potential_loss, potential_metrics, draw.potential_figures,
                      labeled=False, binary_test=False),
}


def kind_of(config):
    return KINDS[model_of(config).kind]
