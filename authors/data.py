"""The data as the authors' released code has it, for the study of that code: its draw of MNIST's
100 labels, its half-moons, and the order in which it walks the unlabeled set. datasets.py is the
paper's; these are options of train.py (--label-draw authors, --moons-setup authors,
--authors-order) that reproduce the released code. docs/authors-code.md gives the file:line of
each in their repositories, and what the runs show.
"""
import numpy as np

from datasets import N_CLASSES, DataError, Dataset, check_labels, checked_subset, first_examples


def labeled_subset(y, labels, n_classes, seed):
    """The released ADGM code's draw (_create_semi_supervised in data_preparation/mnist.py, seed
    123456), for datasets.load's `draw`: `seed` plays no part. One RandomState shuffles each
    class's member positions in turn and keeps the first labels / n_classes; on MNIST in file
    order, that gives their 100 labels."""
    check_labels(labels, n_classes)
    per, rng, chosen = labels // n_classes, np.random.RandomState(123456), []
    for members in (np.flatnonzero(y == c) for c in range(n_classes)):
        positions = np.arange(len(members))
        rng.shuffle(positions)                      # the same Fisher-Yates draws as their list
        chosen.append(members[positions[:per]])
    return checked_subset(chosen, labels, per)


def class_order(data):
    """The released ADGM code's order of the unlabeled set, for datasets.Batches: sorted by class
    and never reshuffled (data_preparation/mnist.py:93-100, training/train.py:34-35). A diagnostic
    of its label leak, not a way to train."""
    return np.argsort(data.y_unlabeled, kind="stable")


def make_moons(n, noise, random_state):
    """sklearn.datasets.make_moons(n, noise=noise, random_state=random_state) on NumPy alone: n // 2
    points of the top moon at evenly spaced t, then the bottom moon, shuffled, plus noise, from the
    same RandomState draws, so the same points. x (n, 2) float64, y (n,) with 0 = top."""
    gen = np.random.RandomState(random_state)
    n_top = n // 2
    t_top, t_bottom = np.linspace(0, np.pi, n_top), np.linspace(0, np.pi, n - n_top)
    x = np.concatenate([np.stack([np.cos(t_top), np.sin(t_top)], 1),
                        np.stack([1 - np.cos(t_bottom), 1 - np.sin(t_bottom) - 0.5], 1)])
    order = gen.permutation(n)                                          # sklearn's shuffle of arange(n)
    x, y = x[order], (order >= n_top).astype(np.int64)
    return x + gen.normal(scale=noise, size=x.shape), y


def half_moons(labels, subset=0):
    """The half-moons of the authors' SDGM repository (data_loaders/half_moon.py): make_moons(10⁴,
    noise 0.2, random_state 1234), every coordinate shifted by one scalar |min|, six fixed labeled
    points (or none), and a test set that is the training set. No seed plays a part. subset=N:
    the first N unlabeled and test examples, as datasets.load keeps them."""
    if labels not in (0, 6):
        raise DataError(f"the authors' half-moons have 6 fixed labeled points, not {labels} (drop --labels)")
    x, y = make_moons(10_000, noise=0.2, random_state=1234)
    x = (x + abs(x.min())).astype(np.float32)
    # the ends and the middle of the top moon (class 0), then of the bottom one, shifted as x
    x_l = np.float32([[0.7, 1.7], [1.6, 2.6], [2.7, 1.7], [1.6, 2.0], [2.7, 1.1], [3.5, 2.0]])[:labels]
    y_l = np.repeat(np.arange(2), 3)[:labels]
    data = Dataset("moons", x_l, y_l, x, y, x, y, N_CLASSES["moons"], likelihood="gaussian", binarize=False)
    return first_examples(data, subset)
