"""bench.py's statistics, on a scripted clock: what "matmul-only" and "in step" mean.

bench.py is a benchmark and asserts nothing about speed; these tests pin down the definitions
its efficiency rests on, with products whose `@` advances a fake clock by scripted amounts.
"""
import numpy as np

import autodiff as ad
import bench


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


def test_matmul_seconds_is_the_median_of_whole_sequences_and_the_sum_of_each_products_best(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench, "clock", clock)
    first, second = Scripted(clock, [3.0, 1.0, 2.0]), Scripted(clock, [5.0, 5.0, 1.0])
    median, best = bench.matmul_seconds([(first, None), (second, None)], repeats=3)
    assert median == 6.0  # the sequences took 3 + 5, 1 + 5, 2 + 1: their median
    assert best == 2.0  # the best of each product, 1 and 1, summed (bench.py's statistic before)


def test_matmul_in_step_times_only_the_products_and_puts_mm_back(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench, "clock", clock)
    original = ad.mm
    calls = []

    def product(a, b):  # every product of a step "takes" 0.5 on the clock
        calls.append(a.shape)
        clock.now += 0.5
        return a @ b

    class Opt:
        def zero_grad(self):
            clock.now += 100.0  # work outside the products is not counted

        def step(self):
            clock.now += 100.0

    class Model:
        def loss(self, x_l, y_l, x_u, alpha, **kw):
            ad.mm(x_l.data, np.ones((2, 2)))
            ad.mm(x_u.data, np.ones((2, 2)))
            return ad.Tensor(np.float64(1.0)), {}

    monkeypatch.setattr(ad, "mm", product)
    batch = (np.ones((3, 2)), np.zeros(3, dtype=int), np.ones((4, 2)), {})
    assert bench.matmul_in_step(Model(), Opt(), batch, steps=3) == 1.0  # two products a step
    assert calls == [(3, 2), (4, 2)] * 3
    assert ad.mm is product  # bench put back what it found
    monkeypatch.setattr(ad, "mm", original)


def test_each_model_is_timed_at_the_inputs_train_py_gives_it():
    """adgm-authors trains on all 784 pixels (--pixels all), the others on the paper's 444."""
    for name, D in [("adgm-authors", 784), ("sdgm", 444)]:
        model, _, (x_l, _, x_u, _) = bench.make_step(name)
        assert model.x_dim == D and x_l.shape == x_u.shape == (100, D)
