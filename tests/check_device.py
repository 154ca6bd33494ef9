"""tests/reference.npz recomputed on this machine's backend (CuPy where a GPU is seen, NumPy
otherwise) in float64: the loss and every gradient of each variant, against the stored values.

    python3 tests/check_device.py            # the backend train.py's --device auto would pick
    python3 tests/check_device.py --device gpu

It prints one line per variant and ends with the largest relative difference; it exits 1 when
that exceeds 1e-10, and 2 with one line when the device cannot be used. The suite runs it on
NumPy; on a GPU it is the check that the CuPy path computes what the NumPy path does.
"""
import argparse
import pathlib
import sys

import numpy as np

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(__file__).resolve().parent)]
import adgm  # noqa: E402
import autodiff as ad  # noqa: E402
import reference  # noqa: E402


def largest_difference(variant, stored):
    """Recompute one variant's loss and gradients on the current backend; the largest difference
    from the stored values, relative to the largest stored value of each array."""
    _, _, temperature, _ = reference.VARIANTS[variant]
    get = lambda kind: {k.split("/", 2)[2]: v for k, v in stored.items()  # noqa: E731
                        if k.startswith(f"{variant}/{kind}/")}
    model = reference.build(variant)
    model.load_state_dict(get("param"))
    model.noise = adgm.Noise(fixed={k: ad.xp.asarray(v) for k, v in get("noise").items()})
    given = get("input")
    x_l, y_l, x_u = (ad.Tensor(ad.xp.asarray(given["x_l"])), ad.xp.asarray(given["y_l"]),
                     ad.Tensor(ad.xp.asarray(given["x_u"])))
    J, _ = model.loss(x_l, y_l, x_u, reference.ALPHA, reference.SAMPLES, temperature)  # J averaged as build says
    J.backward()
    pairs = [(ad.to_numpy(J.data), stored[f"{variant}/term/loss"])]
    pairs += [(ad.to_numpy(p.grad), stored[f"{variant}/grad/{k}"]) for k, p in model.parameters().items()]
    return max(float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-300)) for ours, theirs in pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    try:
        device = ad.set_device(parser.parse_args(argv).device)
    except ad.BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with np.load(reference.PATH, allow_pickle=False) as z:
        stored = {k: z[k] for k in z.files}
    worst = 0.0
    for variant in reference.VARIANTS:
        difference = largest_difference(variant, stored)
        worst = max(worst, difference)
        print(f"{variant}: loss and every gradient within {difference:.1e} of the reference")
    print(f"{device}: largest relative difference {worst:.1e}")
    return 0 if worst <= 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
