"""`dump`: what `moe dump` writes, from this track — logits, losses, routes, every
gradient and the weights after one AdamW step (with `--resume`, also the moments
before and after it) — for reference/parity."""

import numpy as np
from safetensors.numpy import save_file

from .config import TrainConfig
from .model import Batch, Model
from .optim import Trainer
from .params import load_checkpoint, load_training


def dump(batch_path, out, checkpoint=None, resume=None, step=1, train_path=None):
    """Writes the dump on the batch at `batch_path` to `out`; returns a summary line.

    From `checkpoint` (config.json + model.safetensors) the AdamW step is step number
    `step` (sets lr and bias correction) from zero moments. From a `moe train`
    checkpoint `resume` it continues the saved moments as step saved + 1, with the
    saved settings, and the moments before and after it are written as `m.<name>`,
    `v.<name>`, `m_after.<name>`, `v_after.<name>`. `train_path` overrides the settings.
    """
    batch = Batch.load(batch_path)
    if resume is not None:
        config, params, moments, done, train = load_training(resume)
        step = done + 1
    else:
        (config, params), moments, train = load_checkpoint(checkpoint), None, TrainConfig()
    if train_path:
        train = TrainConfig.load(train_path)
    model = Model(config, params)
    losses, grads, logits, routes = model.loss_and_grads(batch, train.aux_loss_alpha)
    tensors = {
        "logits": logits,
        "loss.ce": np.array([losses.ce], np.float32),
        "loss.aux": np.array([losses.aux], np.float32),
        "loss.total": np.array([losses.total], np.float32),
    }
    tensors |= {f"route.{l}": r.astype(np.int32) for l, r in enumerate(routes)}
    tensors |= {f"grad.{n}": g for n, g in grads.items()}
    if moments is not None:
        tensors |= {f"{k}.{n}": x.copy() for k, ms in zip("mv", moments) for n, x in ms.items()}
    trainer = Trainer(model, train, step - 1, moments)
    stats = trainer.apply(losses, grads, step)
    tensors |= {f"after.{n}": p for n, p in model.params.items()}
    if moments is not None:
        after = (trainer.optimizer.m, trainer.optimizer.v)
        tensors |= {f"{k}_after.{n}": x for k, ms in zip("mv", after) for n, x in ms.items()}
    save_file({n: np.ascontiguousarray(t) for n, t in tensors.items()}, str(out))
    return (f"wrote {out}: loss {stats.loss:.6f} (ce {stats.ce:.6f}, aux {stats.aux:.6f}), "
            f"grad norm {stats.grad_norm:.6f}, lr {stats.lr:.3e} at step {step}")
