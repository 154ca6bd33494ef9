"""The error of q(y|a,x) on a run's unlabeled training images, where the released ADGM code's
label leak acts (README, "A label leak"). From the repository root:

    python3 docs/runs/mnist-leak/train_error.py RUN_DIR [SAMPLES]
"""
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
import autodiff as ad  # noqa: E402
import train  # noqa: E402

run = pathlib.Path(sys.argv[1])
samples = int(sys.argv[2]) if len(sys.argv) > 2 else 1
epoch, config = train.load_checkpoint(run / "checkpoint.npz")
config = {**train.COMMON, **config}
ad.rng.reseed(config["seed"])
data = train.load_data(config)
model = train.build_model(config, data)
train.load_checkpoint(run / "checkpoint.npz", model)
model.eval()
with train.own_generator((config["seed"], epoch)):
    x, y = data.x_unlabeled, data.y_unlabeled
    preds = np.concatenate([ad.to_numpy(model.predict(ad.xp.asarray(x[i:i + 500]), samples))
                            for i in range(0, len(x), 500)])
print(f"{run} (epoch {epoch}): error on the {len(x)} unlabeled training images {100 * np.mean(preds != y):.2f}%")
