"""bench.py's statistics: what "matmul-only" means, which products it records, and that it times
the step train.py takes.

bench.py is a benchmark and asserts nothing about speed; these tests pin down the definitions its
efficiency rests on (with products whose `@` advances a fake clock by scripted amounts), and that
the products it records from outside autodiff are those of the step, forward and backward; and
that it runs as a module and as a file.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import adgm
from cli import kinds
import autodiff as ad
from tools import bench
from cli import options
import train


@pytest.fixture
def small_mnist_networks(monkeypatch):
    """Networks of 8 hidden units and dim(a) = dim(z) = 2 in the MNIST configuration: the same
    step, quicker."""
    monkeypatch.setitem(options.DEFAULTS["mnist"], "hidden", [8])
    monkeypatch.setitem(options.DEFAULTS["mnist"], "latent", [2, 2])


class Clock:
    """A clock that moves only when a Scripted product runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Scripted:
    """Stands for an operand: `self @ other` takes the next of `durations` on `clock`."""

    def __init__(self, clock, durations):
        self.clock, self.durations = clock, iter(durations)

    def __matmul__(self, other):
        self.clock.now += next(self.durations)


def test_matmul_seconds_is_the_median_of_whole_sequences(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench, "clock", clock)
    first, second = Scripted(clock, [3.0, 1.0, 2.0]), Scripted(clock, [5.0, 5.0, 1.0])
    assert bench.matmul_seconds([(first, None), (second, None)], repeats=3) == 6.0  # 3 + 5, 1 + 5, 2 + 1


def test_each_model_is_timed_at_the_inputs_train_py_gives_it():
    """adgm-authors trains on all 784 pixels (--pixels all), the others on the paper's 444; each
    with train.py's optimizer settings and batch objective."""
    for name, D, clip_value in [("adgm-authors", 784, 1.0), ("sdgm", 444, None)]:
        model, opt, loss, (x_l, _, x_u) = bench.make_step(name)
        assert model.x_dim == D and x_l.shape == x_u.shape == (100, D)
        assert opt.clip_value == clip_value and loss.keywords["alpha"] == (1200.0 if clip_value else 60.0)


def test_the_recorded_products_are_the_steps_forward_and_backward():
    """A layer x (5, 3) -> 4 whose input needs no gradient: forward x W, backward x^T g (the
    weight's gradient); with a second layer on top, g W^T for the hidden layer too. Every product
    is recorded once, and the wrappers are gone after the block."""
    ad.rng.reseed(0)
    net = ad.MLP(3, (4,), dtype="float64")
    head = ad.Linear(4, 2, dtype="float64")
    x = ad.Tensor(np.ones((5, 3)))
    with bench.recording_products([]) as products:
        (head(net(x)) * 1.0).sum().backward()
    shapes = [(a.shape, b.shape) for a, b in products]
    assert shapes == [((5, 3), (3, 4)), ((5, 4), (4, 2)),     # forward
                      ((5, 2), (2, 4)), ((4, 5), (5, 2)),     # backward through the head
                      ((3, 5), (5, 4))]                       # the first layer's weight gradient only
    assert bench.flops(products) == 2 * 5 * (3 * 4 + 4 * 2 + 2 * 4 + 4 * 2 + 3 * 4)
    assert ad.linear.__name__ == "linear" and ad.matmul.__name__ == "matmul"


def test_bench_times_train_py_s_step(monkeypatch, small_mnist_networks):
    """time_steps and the product count go through train.train_step, and a step through bench
    changes the model as a step of train.py does."""
    calls = []
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *args: calls.append(args[2]) or step(*args))
    model, opt, loss, batch = bench.make_step("m2")
    before = {k: p.data.copy() for k, p in model.parameters().items()}
    (fwd, bwd, adam), total = bench.time_steps(model, opt, loss, batch, steps=1, warmup=0)
    assert len(calls) == 1 and min(fwd, bwd, adam) > 0 and total == pytest.approx(fwd + bwd + adam)
    assert bench.flops(bench.step_products(model, opt, loss, batch)) > 0 and calls[1] is loss
    assert any(not np.array_equal(before[k], p.data) for k, p in model.parameters().items())


def test_no_split_concatenates_the_inputs_and_computes_the_same_step(small_mnist_networks):
    """--no-split: one product per multi-input layer over the concatenated inputs, the same J."""
    model, opt, loss, batch = bench.make_step("m2")
    results = []
    for context in (bench.contextlib.nullcontext(), bench.concatenated_first_layers()):
        with context, bench.recording_products([]) as products:
            ad.rng.reseed(1)  # the same noise
            results.append((float(loss(model, batch)[0].data), len(products)))
    (J, split), (J_concatenated, concatenated) = results
    assert J_concatenated == pytest.approx(J, rel=1e-5) and concatenated < split
    assert ad.Linear.__call__.__name__ == "__call__" and isinstance(model, adgm.M2)


@pytest.mark.parametrize("name", ["adgm", "m2"])
def test_evaluation_is_timed_through_train_py_s_evaluate(name):
    """evaluation_seconds runs train.evaluate with a configuration train.py would accept."""
    model = kinds.MODELS[name].cls(20, 10, (8,), 4, 4)
    seconds = bench.evaluation_seconds(model, name, n=600)
    assert 0 < seconds < 60


def test_bench_runs_as_a_module_and_as_a_file(tmp_path):
    """python3 -m tools.bench from the repository, and python3 tools/bench.py from anywhere."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv, cwd in ((["-m", "tools.bench"], root), ([os.path.join(root, "tools", "bench.py")], tmp_path)):
        done = subprocess.run([sys.executable, *argv, "--help"], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr


def test_off_posix_bench_says_where_it_runs():
    """It times train.py's step, which needs POSIX: elsewhere one line says so, before an import fails."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import numpy, os, runpy, sys; os.name = 'nt'; sys.modules['resource'] = None; "  # NumPy's own import reads os.name
            "runpy.run_path(sys.argv[1], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, os.path.join(root, "tools", "bench.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.stderr.splitlines() == ["error: tools/bench.py needs a POSIX system such as Linux or macOS, as "
                                        "train.py does; on Windows, run it under WSL"] and done.returncode == 2
