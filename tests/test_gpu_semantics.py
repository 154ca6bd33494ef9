"""GPU semantics without a GPU: the project's array code run on fake_cupy, a CuPy stand-in.

fake_cupy's arrays refuse what cupy.ndarray refuses (implicit conversion to NumPy, host arrays
mixed into device operations) and count every host<->device transfer. Here we check

1. the double itself: it behaves like CuPy, and it does catch planted violations;
2. autodiff on it: forward, backward and an Adam step of a small MLP run unchanged, keep every
   array on the device, transfer nothing, and match the same step on NumPy;
3. the explicit edges: to_numpy, state_dict and load_state_dict;
4. the models of adgm.py on it: a training step with no transfer, the same numbers as NumPy;
5. datasets.Batches (one upload, then nothing per batch), train.py's epoch loop (host syncs
   that do not grow with the number of batches), evaluation, figures and checkpoints.

Every training step below runs inside `fake_cupy.record()`: an empty log means no host sync
(float(), .item(), asnumpy) and no upload of a host array (a hidden np.zeros or np.eye).
"""
import json

import numpy as np
import pytest

import adgm
from authors import models as authors
from cli import kinds
import autodiff as ad
from tools import bench
from cli import checkpoints, progress
import datasets
import fake_cupy
import train

F32_TOL = dict(rtol=1e-6, atol=1e-7)  # the two backends run the same float32 arithmetic


@pytest.fixture
def xp():
    """The fake GPU backend, with the transfer counters at zero (conftest restores NumPy)."""
    ad.use_array_module(fake_cupy, seed=0)
    fake_cupy.reset()
    return fake_cupy


def on_device(array):
    return isinstance(array, fake_cupy.FakeArray)


# ---------------------------------------------------------------------------------------------
# 1. The double behaves like CuPy
# ---------------------------------------------------------------------------------------------

def test_implicit_conversion_to_numpy_is_refused(xp):
    a = xp.ones(3)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array([a, a])
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.ones(3)[xp.arange(2)]  # a device index into a host array


@pytest.mark.parametrize("operation", [
    lambda a, h: a + h,
    lambda a, h: h + a,
    lambda a, h: h * a,
    lambda a, h: a - h[0:1],
    lambda a, h: a @ h,
    lambda a, h: a < h,
    lambda a, h: a + np.asarray(2.0),  # even a 0-d host array
    lambda a, h: a.__iadd__(h),
    lambda a, h: a[np.array([0, 1])],
    lambda a, h: a.__setitem__(slice(None), h),
    lambda a, h: fake_cupy.exp(h),
    lambda a, h: fake_cupy.maximum(a, h),
    lambda a, h: fake_cupy.concatenate([a, h]),
    lambda a, h: np.concatenate([a, h]),
    lambda a, h: np.add(a, 1.0, out=h),
    lambda a, h: np.add.at(a, np.array([0]), 1.0),
    lambda a, h: fake_cupy.add.at(a, np.array([0]), 1.0),
], ids=["fake+np", "np+fake", "np*fake", "fake-np", "matmul", "compare", "0-d host", "iadd",
        "host index", "host value", "xp.exp(np)", "xp.maximum", "xp.concatenate", "np.concatenate",
        "out=np", "np.add.at", "xp.add.at"])
def test_mixing_with_host_arrays_is_refused(xp, operation):
    a, h = xp.arange(3.0), np.ones(3)
    with pytest.raises(TypeError):
        operation(a, h)


def test_scalars_mix_and_results_stay_on_the_device(xp):
    a = xp.arange(3.0)
    results = [a + 1.0, 2 * a, np.float32(2) * a, a ** 2, -a, abs(a), a > 0, np.exp(a),
               xp.maximum(a, 0), np.sum(a), a.sum(), a.max(axis=0), a[1], a[None, :2], a.T]
    assert all(on_device(r) for r in results), [type(r) for r in results]
    assert xp.asnumpy(2 * a + 1.0).tolist() == [1.0, 3.0, 5.0]


def test_reductions_indexing_and_iteration_give_0d_device_arrays(xp):
    a = xp.arange(6.0).reshape(2, 3)
    for scalar in (a.sum(), np.sum(a), a.max(), a[1, 2], xp.dot(a[0], a[1]), a.argmax()):
        assert on_device(scalar) and scalar.shape == ()
    assert all(on_device(row) and row.shape == (3,) for row in a)
    assert xp.transfers == {"h2d": 0, "d2h": 0}


def test_explicit_transfers_are_counted(xp):
    host = np.arange(4.0)
    a = xp.asarray(host)
    assert on_device(a) and xp.transfers == {"h2d": 1, "d2h": 0}
    assert xp.asarray(a) is a and xp.transfers["h2d"] == 1  # a device array: no copy
    assert (a * 2.0 + np.float32(1)).shape == (4,) and xp.transfers["h2d"] == 1  # scalar operands: free
    assert xp.asarray(1.0).shape == () and xp.transfers["h2d"] == 2  # a scalar made an array: a copy
    host[0] = 99.0
    got = [xp.asnumpy(a), a.get(), float(a[1]), int(a[2]), bool(a[3]), a[0].item(), a.tolist()]
    assert isinstance(got[0], np.ndarray) and got[0][0] == 0.0  # asarray copied
    assert got[2:5] == [1.0, 2, True]
    assert xp.transfers == {"h2d": 2, "d2h": 7}
    assert [kind for kind, _, _ in xp.events] == ["h2d"] * 2 + ["d2h"] * 7
    assert __file__ in xp.events[-1][2]  # where: this file


def test_only_0d_arrays_convert_to_python_scalars(xp):
    a = xp.ones(3)
    for convert in (float, int, bool):
        with pytest.raises(TypeError):
            convert(a)
    with pytest.raises(TypeError):
        if a > 0:  # the classic accidental sync on an array
            pass


def test_record_catches_a_planted_sync(xp):
    loss = xp.ones(3).sum()
    with xp.record() as clean:
        loss = loss * 2
    with xp.record() as dirty:
        if loss > 0:  # a hidden sync (bool of a device scalar)
            loss = loss * float(loss)  # and another
    assert clean == []
    assert [kind for kind, _, _ in dirty] == ["d2h", "d2h"]


def test_views_and_in_place_operators_share_memory(xp):
    a = xp.zeros(6, dtype="float32")
    alias = a
    alias += 1.0
    assert alias is a
    view = a[2:4].reshape(2, 1)
    view *= 3.0
    a.reshape(2, 3)[1] += xp.ones(3, dtype="float32")
    row = a[0:3]
    row[...] = a[3:6] - 1.0
    np.add.at(a, xp.asarray([0, 0]), 1.0)  # scatter-add in place (a list index is an upload)
    assert xp.asnumpy(a).tolist() == [5.0, 1.0, 1.0, 4.0, 2.0, 2.0]
    assert a.dtype == np.float32


def test_random_generator_mirrors_cupy(xp):
    gen = xp.random.default_rng(0)
    normal = gen.standard_normal((2, 3), dtype="float32")
    uniform = gen.random((4,), dtype=np.float64)
    ints = gen.integers(0, 5, size=7)
    assert on_device(normal) and normal.dtype == np.float32 and normal.shape == (2, 3)
    assert on_device(uniform) and uniform.dtype == np.float64 and float(uniform.max()) < 1
    assert on_device(ints) and ints.dtype == np.int64
    with pytest.raises(TypeError):
        gen.random(3, dtype="int32")  # cupy draws floats of 32 or 64 bits only
    with pytest.raises(AttributeError):
        gen.permutation(3)  # cupy.random.Generator has none
    with pytest.raises(AttributeError):
        xp.random.normal(size=3)  # unseeded global randomness is left out on purpose


def test_a_generator_state_is_checked_on_the_device_too(xp):
    """A checkpoint's stream: CuPy's continues from its seed, and a NumPy state in it, which only
    a CPU run can continue, is still refused when it is damaged, as on the CPU."""
    ad.rng.set_state(json.dumps({"seed": 7}))
    first = ad.to_numpy(ad.rng.normal((3,)))
    ad.rng.set_state(json.dumps({"seed": 7, "numpy": np.random.PCG64(1).state}))
    assert (ad.to_numpy(ad.rng.normal((3,))) == first).all()
    with pytest.raises(TypeError, match="dict"):
        ad.rng.set_state('{"seed": 0, "numpy": 3}')


def test_the_module_offers_numpy_names(xp):
    assert xp.float32 is np.float32 and xp.newaxis is None and xp.pi == np.pi and xp.inf == np.inf
    assert xp.ndarray is fake_cupy.FakeArray and xp.get_array_module(xp.ones(1)) is xp
    assert on_device(xp.linalg.norm(xp.ones(4))) and on_device(xp.zeros_like(xp.ones(2)))
    assert all(on_device(p) for p in xp.split(xp.arange(6), [2, 4]))


# ---------------------------------------------------------------------------------------------
# 2. autodiff on the fake GPU: forward, backward and Adam, unchanged
# ---------------------------------------------------------------------------------------------

class Net(ad.Module):
    """A small network touching most primitives: BatchNorm, a Gaussian head, log-softmax."""

    def __init__(self):
        self.body = ad.MLP(4, [8, 8], batchnorm=True)
        self.head = ad.Linear(8, 3)
        self.gauss = ad.GaussianHead(8, 2)

    def loss(self, x, y, eps):
        h = self.body(x)                                                      # (B, 8)
        log_p = ad.log_softmax(self.head(h), axis=-1)                         # (B, 3)
        mu, logvar = self.gauss(h)                                            # (B, 2)
        z = mu + ad.exp(0.5 * logvar) * eps
        log_q = (-0.5 * (logvar + (z - mu) ** 2 * ad.exp(-logvar))).sum(axis=-1)
        picked = log_p[ad.xp.arange(x.shape[0]), y]                           # scatter-add in backward
        both = ad.concat([ad.logaddexp(z, -z), ad.sin(z).reshape(-1, 2).T.T], axis=-1)
        return (-picked + both.sum(axis=-1) - log_q).mean() / 2 + ad.sigmoid(h).mean()


def _inputs():
    gen = np.random.default_rng(1)
    return (gen.standard_normal((5, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1]),
            gen.standard_normal((5, 2)).astype(np.float32))


def _train_step(module, state, inputs, planted=None):
    """Build Net on `module`, load `state`, upload the inputs, then one recorded step:
    zero_grad, forward, backward, Adam (with clipping). Returns (net, loss, log)."""
    ad.use_array_module(module, seed=0)
    net = Net()
    net.load_state_dict(state)
    opt = ad.Adam(net.parameters(), lr=1e-2, clip=1.0)
    x, y, eps = (ad.xp.asarray(v) for v in inputs)  # the explicit upload, before the step
    with (fake_cupy.record() if module is fake_cupy else _no_record()) as log:
        opt.zero_grad()
        loss = net.loss(ad.Tensor(x), y, ad.Tensor(eps))
        if planted:
            loss = planted(loss)
        loss.backward()
        opt.step()
    return net, loss, log


class _no_record:
    def __enter__(self):
        return []

    def __exit__(self, *exc):
        return False


@pytest.fixture
def initial_state():
    return Net().state_dict()  # built on NumPy (conftest), as host arrays


def test_mlp_step_runs_on_the_device_without_transfers(xp, initial_state):
    net, loss, log = _train_step(xp, initial_state, _inputs())
    assert log == []
    assert on_device(loss.data) and loss.data.shape == ()
    for name, p in net.parameters().items():
        assert on_device(p.data) and on_device(p.grad), name
        assert p.data.dtype == p.grad.dtype == np.float32, name
    assert all(on_device(t.data) for _, t in net.named_tensors())  # BatchNorm buffers too


def test_mlp_step_matches_numpy(xp, initial_state):
    inputs = _inputs()
    ref_net, ref_loss, _ = _train_step(np, initial_state, inputs)
    net, loss, _ = _train_step(xp, initial_state, inputs)
    np.testing.assert_allclose(ad.to_numpy(loss.data), ref_loss.data, **F32_TOL)
    ref = ref_net.parameters()
    for name, p in net.parameters().items():
        np.testing.assert_allclose(ad.to_numpy(p.grad), ref[name].grad, **F32_TOL, err_msg=name)
        np.testing.assert_allclose(ad.to_numpy(p.data), ref[name].data, **F32_TOL, err_msg=name)
        assert not np.array_equal(ad.to_numpy(p.data), initial_state[name]), f"{name} did not move"
    ref_buffers = dict(ref_net.named_tensors())
    for name, t in net.named_tensors():
        np.testing.assert_allclose(ad.to_numpy(t.data), ref_buffers[name].data, **F32_TOL, err_msg=name)


def _hidden_host_array(loss):
    return loss + ad.Tensor(np.zeros((), dtype=np.float32))  # np.zeros inside a step


def _host_sync(loss):
    return loss * float(loss.data)  # a float() of the loss inside a step


@pytest.mark.parametrize("planted, kind", [(_hidden_host_array, "h2d"), (_host_sync, "d2h")])
def test_a_planted_transfer_in_the_step_is_caught(xp, initial_state, planted, kind):
    _, _, log = _train_step(xp, initial_state, _inputs(), planted)
    assert [k for k, _, _ in log] == [kind], log
    assert __file__ in log[0][2]  # and it says where


@pytest.mark.parametrize("planted", [
    lambda t: ad.Tensor(np.asarray(t.data)),           # an implicit device->host conversion
    lambda t: ad._node(t.data * np.ones(1, np.float32), (t,), lambda g: (g,)),  # a host array in an op
    lambda t: ad._node(t.data, (t,), lambda g: (g + np.zeros(g.shape, g.dtype),)),  # ... in a gradient rule
], ids=["np.asarray", "host array in forward", "host array in backward"])
def test_a_planted_host_array_in_an_op_raises(xp, initial_state, planted):
    with pytest.raises(TypeError):
        _train_step(xp, initial_state, _inputs(), planted)


def test_random_draws_stay_on_the_device(xp):
    p = xp.full((3, 4), 0.5, dtype="float32")
    with xp.record() as log:
        draws = [ad.rng.normal((2, 3)), ad.rng.uniform((4,), "float64"), ad.rng.bernoulli(p),
                 ad.rng.permutation(7)]
    assert log == [] and all(on_device(d) for d in draws)
    assert draws[0].dtype == draws[2].dtype == np.float32
    assert sorted(xp.asnumpy(draws[3]).tolist()) == list(range(7))


def test_no_grad_forward_on_the_device(xp):
    net = Net().eval()
    x, y, eps = (xp.asarray(v) for v in _inputs())
    with xp.record() as log, ad.no_grad():
        loss = net.loss(ad.Tensor(x), y, ad.Tensor(eps))
    assert log == [] and on_device(loss.data) and not loss.requires_grad


# ---------------------------------------------------------------------------------------------
# 3. The explicit edges: to_numpy, checkpoints
# ---------------------------------------------------------------------------------------------

def test_to_numpy_is_the_explicit_transfer(xp):
    a = xp.arange(3.0)
    out = ad.to_numpy(a)
    assert type(out) is np.ndarray and out.tolist() == [0.0, 1.0, 2.0]
    assert xp.transfers == {"h2d": 0, "d2h": 1}
    assert type(ad.to_numpy(np.ones(2))) is np.ndarray and xp.transfers["d2h"] == 1


def test_state_dicts_cross_the_edge_explicitly(xp, initial_state):
    net, _, _ = _train_step(xp, initial_state, _inputs())
    state = net.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())
    fresh = Net()
    fresh.load_state_dict(state)  # host arrays copied to the device
    assert all(on_device(t.data) for _, t in fresh.named_tensors())
    opt = ad.Adam(fresh.parameters())
    opt.load_state_dict({"m": np.zeros_like(ad.to_numpy(opt.m)), "v": np.zeros_like(ad.to_numpy(opt.v)),
                         "t": np.asarray(3), "lr": np.asarray(1e-3)})
    assert all(type(v) is np.ndarray for v in opt.state_dict().values())
    assert on_device(opt.m) and opt.t == 3


# ---------------------------------------------------------------------------------------------
# 4. The models of adgm.py on the fake GPU
# ---------------------------------------------------------------------------------------------

SEMI_SUPERVISED = ["ADGM", "SDGM", "M2", "ADGMDeterministic"]


def _semi_batch():
    gen = np.random.default_rng(2)
    x_l = (gen.random((4, 6)) < 0.5).astype(np.float32)
    x_u = (gen.random((4, 6)) < 0.5).astype(np.float32)
    return x_l, np.array([0, 1, 2, 1]), x_u


def _semi_step(module, name, state=None, batchnorm=False):
    """One recorded training step of a tiny semi-supervised model; returns (model, J, stats, log)."""
    ad.use_array_module(module, seed=0)
    model = getattr(adgm, name)(6, 3, hidden=(8,), a_dim=2, z_dim=2, batchnorm=batchnorm)
    if state is not None:
        model.load_state_dict(state)
    opt = ad.Adam(model.parameters(), lr=1e-2)
    x_l, y_l, x_u = (ad.xp.asarray(v) for v in _semi_batch())
    ad.rng.reseed(0)
    with (fake_cupy.record() if module is fake_cupy else _no_record()) as log:
        opt.zero_grad()
        J, stats = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), alpha=0.5, samples=2)
        J.backward()
        opt.step()
    return model, J, stats, log


@pytest.mark.parametrize("name", SEMI_SUPERVISED)
def test_semi_supervised_training_step_on_the_device(xp, name):
    model, J, stats, log = _semi_step(xp, name, batchnorm=True)
    assert log == []
    assert on_device(J.data) and J.data.shape == ()
    assert all(on_device(v) and v.shape == () for v in stats.values()), stats
    assert all(on_device(p.data) and on_device(p.grad) for p in model.parameters().values())


@pytest.mark.parametrize("name", ["ADGM", "M2"])
def test_semi_supervised_step_matches_numpy(xp, name):
    """Both backends draw ε from PCG64 seeded 0 (autodiff's NumPy generator and fake_cupy's),
    so the same step gives the same numbers."""
    ad.use_array_module(np, seed=0)
    state = getattr(adgm, name)(6, 3, hidden=(8,), a_dim=2, z_dim=2).state_dict()
    ref, ref_J, ref_stats, _ = _semi_step(np, name, state)
    model, J, stats, _ = _semi_step(xp, name, state)
    np.testing.assert_allclose(ad.to_numpy(J.data), ref_J.data, rtol=1e-5)
    for key, value in stats.items():
        np.testing.assert_allclose(ad.to_numpy(value), ref_stats[key], rtol=1e-5, atol=1e-6, err_msg=key)
    ref_params = ref.parameters()
    for key, p in model.parameters().items():
        np.testing.assert_allclose(ad.to_numpy(p.data), ref_params[key].data, rtol=1e-5, atol=1e-6, err_msg=key)


def test_unsplit_first_layer_step_on_the_device(xp):
    """bench.py's variant: the inputs tiled and concatenated for one product per layer."""
    with bench.concatenated_first_layers():
        _, J, _, log = _semi_step(xp, "SDGM")
    assert log == [] and on_device(J.data)


def test_semi_supervised_analysis_stays_on_the_device(xp):
    model = adgm.ADGM(6, 3, hidden=(8,), a_dim=2, z_dim=2)
    sdgm = adgm.SDGM(6, 3, hidden=(8,), a_dim=2, z_dim=2)
    x = xp.asarray(_semi_batch()[0])
    y, z = xp.asarray(np.array([0, 2])), xp.asarray(np.zeros((2, 2), np.float32))
    with xp.record() as log:
        outputs = [model.predict(x, samples=2), model.predict_bayes(x, samples=2),
                   *model.evaluate(x, samples=2), model.log_likelihood(x, iw_samples=4, chunk=2),
                   *model.encode(x), model.generate(y, z), sdgm.generate(y, z), *model.kl_per_unit(x)]
    assert log == []
    assert all(on_device(o) for o in outputs), [type(o) for o in outputs]


@pytest.mark.parametrize("layers", [1, 2])
def test_auxiliary_vae_training_step_on_the_device(xp, layers):
    model = adgm.AuxiliaryVAE(6, layers=layers, hidden=(8,), a_dim=2, z_dim=2)
    opt = ad.Adam(model.parameters(), lr=1e-2)
    x = xp.asarray(_semi_batch()[0])
    with xp.record() as log:
        opt.zero_grad()
        loss, stats = model.loss(ad.Tensor(x), samples=2)
        loss.backward()
        opt.step()
        ll = model.log_likelihood(x, iw_samples=4, chunk=2)
    assert log == [] and on_device(ll) and all(on_device(v) for v in stats.values())


# ---------------------------------------------------------------------------------------------
# 5. datasets.Batches and a training epoch on the fake GPU
# ---------------------------------------------------------------------------------------------


def _tiny_dataset(binarize, n=24):
    gen = np.random.default_rng(3)
    x = gen.random((n, 6)).astype(np.float32)
    y = np.arange(n) % 3
    return datasets.Dataset("tiny", x[:6], y[:6], x, y, x[:5], y[:5], n_classes=3,
                            likelihood="bernoulli", binarize=binarize)


def _epochs(module, binarize, epochs=2):
    """Batches of the tiny set on `module`: (the batches as host arrays, uploads, in-epoch log)."""
    ad.use_array_module(module, seed=0)
    data = _tiny_dataset(binarize)
    with (fake_cupy.record() if module is fake_cupy else _no_record()) as uploads:
        batches = datasets.Batches(data, 4, 8)
    with (fake_cupy.record() if module is fake_cupy else _no_record()) as log:
        seen = [batch for _ in range(epochs) for batch in batches.epoch()]
    return [tuple(ad.to_numpy(a) for a in batch) for batch in seen], uploads, log, seen


@pytest.mark.parametrize("binarize", [False, True])
def test_batches_upload_once_and_stay_on_the_device(xp, binarize):
    host, uploads, log, seen = _epochs(xp, binarize)
    assert [kind for kind, _, _ in uploads] == ["h2d"] * 3  # x_labeled, y_labeled, x_unlabeled
    assert log == []  # nothing per batch or per epoch
    assert len(seen) == 2 * 3
    for x_l, y_l, x_u in seen:
        assert on_device(x_l) and on_device(y_l) and on_device(x_u)
        assert x_l.shape == (4, 6) and y_l.shape == (4,) and x_u.shape == (8, 6)
        assert x_l.dtype == x_u.dtype == np.float32 and y_l.dtype == np.int64


@pytest.mark.parametrize("binarize", [False, True])
def test_batches_match_numpy(xp, binarize):
    """Same generator stream on both backends, so the same batches."""
    ref, _, _, _ = _epochs(np, binarize)
    host, _, _, _ = _epochs(xp, binarize)
    assert len(host) == len(ref)
    for (a, b, c), (ra, rb, rc) in zip(host, ref):
        np.testing.assert_array_equal(a, ra)
        np.testing.assert_array_equal(b, rb)
        np.testing.assert_array_equal(c, rc)


AUTHORS_STEP = dict(loss_average="rows", clip_value=1.0, decay=1e-3)  # train.py's defaults for adgm-authors


@pytest.mark.parametrize("name, batchnorm, options", [
    ("adgm", False, {}), ("adgm", True, {}), ("sdgm", False, {}), ("m2", False, {}), ("adgm-det", False, {}),
    ("adgm-authors", False, AUTHORS_STEP), ("adgm-authors-det", False, AUTHORS_STEP)])
def test_training_steps_make_no_transfer(xp, name, batchnorm, options):
    """Thirty steps of train.train_step, over six epochs of device batches, with a warm-up
    temperature, gradient clipping and the epoch's running sums of the stats: not one
    host<->device copy inside any step, Python scalars included (on a GPU each is a
    synchronous copy). The first step of an epoch also draws that epoch's permutation."""
    config = {"dataset": "tiny", "model": name, "samples": 1, "temperature_a": 1.0, "qy_average": False,
              "loss_average": options.get("loss_average", "halves"), "authors_order": False}
    cls = authors.study_class(kinds.MODELS[name].cls, config)  # adgm-authors: J the mean of all rows
    model = cls(6, 3, hidden=(8,), a_dim=2, z_dim=2, batchnorm=batchnorm)
    weights = [w for m in model.modules() if isinstance(m, ad.Linear) for w in m.weight if w.requires_grad]
    opt = ad.Adam(model.parameters(), lr=1e-3, clip=5.0, clip_value=options.get("clip_value"),
                  decay=options.get("decay", 0.0), decayed=weights)
    batches = datasets.Batches(_tiny_dataset(True, 40), 4, 8)  # 5 batches per epoch
    stream = (batch for _ in range(6) for batch in batches.epoch())
    sums, first_bad, logs = None, ad.xp.full((), -1), []
    for step in range(1, 31):
        loss = train.step_loss(config, 0.5, min(1.0, step / 20))
        with xp.record() as log:
            J, stats = train.train_step(model, opt, loss, next(stream))
            sums = stats if sums is None else {k: sums[k] + v for k, v in stats.items()}
            first_bad = ad.xp.where((first_bad < 0) & ~ad.xp.isfinite(J.data), step, first_bad)
        logs.append(log)
    assert [step for step, log in enumerate(logs, 1) if log] == [], next(log for log in logs if log)
    assert int(first_bad) == -1 and all(np.isfinite(float(v)) for v in sums.values())


def test_a_training_epoch_makes_no_per_batch_transfer(xp):
    """train.train_epoch on the device: its host syncs (the non-finite check, progress, the
    epoch means) do not grow with the number of batches: those of 10 batches and of 50 (one
    check after the first batch, one every 50 and at the last)."""
    config = {"warmup": 0, "dataset": "tiny", "model": "adgm", "samples": 1, "batch_size": 4, "loss_average": "halves",
              "temperature_a": 1.0}
    counts = []
    for n in (80, 400):  # 10 and 50 batches of 8 unlabeled examples
        model = adgm.ADGM(6, 3, hidden=(8,), a_dim=2, z_dim=2)
        opt = ad.Adam(model.parameters(), lr=1e-3)
        batches = datasets.Batches(_tiny_dataset(True, n), 4, 8)
        with xp.record() as log:
            row = train.train_epoch(model, opt, batches, config, 1, 0.5, progress.Progress(1))
        assert all(isinstance(v, float) and np.isfinite(v) for v in row.values()), row
        assert all(kind == "d2h" for kind, _, _ in log), log
        counts.append(len(log))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_potential_model_step_on_the_device(xp, k):
    model = adgm.PotentialModel(datasets.POTENTIALS[k], auxiliary=True, hidden=(8,))
    opt = ad.Adam(model.parameters(), lr=1e-3)
    with xp.record() as log:
        opt.zero_grad()
        loss, stats = model.loss(samples=10)
        loss.backward()
        opt.step()
        log_z, samples = model.log_z(20), model.sample(5)
    assert log == [] and on_device(log_z) and on_device(samples) and samples.shape == (5, 2)


@pytest.mark.parametrize("x_dim, image_shape", [(2, None), (6, (2, 3))], ids=["moons-like", "images"])
def test_evaluation_figures_and_checkpoints_run_on_the_device(xp, tmp_path, x_dim, image_shape):
    """train.py's edges: test metrics, figures and checkpoints cross to the host explicitly."""
    x = np.random.default_rng(3).random((30, x_dim)).astype(np.float32)
    y = np.arange(30) % 3
    data = datasets.Dataset("tiny", x[:6], y[:6], x, y, x[:12], y[:12], n_classes=3,
                            likelihood="bernoulli", binarize=True, image_shape=image_shape)
    model = adgm.SDGM(x_dim, 3, hidden=(8,), a_dim=2, z_dim=2)
    opt = ad.Adam(model.parameters(), lr=1e-3)
    config = {"dataset": "tiny", "model": "sdgm", "iw_samples": 4, "eval_images": 0, "eval_samples": 2, "seed": 0,
              "eval_train": True}
    row = train.evaluate(model, data, config, final=True)
    assert all(isinstance(v, float) for v in row.values()), row
    assert {"train_error_pct", "kl_a_1", "kl_a_2"} <= row.keys()
    (tmp_path / "figures").mkdir()
    train.redraw_figures(model, data, config, tmp_path, [{"epoch": "1", "test_error_pct": "50"}], 1)
    assert (tmp_path / "figures" / "kl_per_unit.png").is_file()
    checkpoints.save_checkpoint(tmp_path / "checkpoint.npz", model, opt, 1, config)
    again = adgm.SDGM(x_dim, 3, hidden=(8,), a_dim=2, z_dim=2)
    assert checkpoints.load_checkpoint(tmp_path / "checkpoint.npz", again, ad.Adam(again.parameters()))[0] == 1
    for name, t in again.named_tensors():
        assert on_device(t.data), name
    saved, loaded = model.state_dict(), again.state_dict()
    assert loaded.keys() == saved.keys()
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
