"""`dump`: what `moe dump` writes, from this track — logits, losses, routes, every
gradient and the weights after one AdamW step — for reference/parity."""

import numpy as np
from safetensors.numpy import save_file

from .config import TrainConfig
from .model import Batch, Model
from .optim import Trainer
from .params import load_checkpoint


def dump(checkpoint, batch_path, out, step, train_path=None):
    """Writes the dump of `checkpoint` on the batch at `batch_path` to `out`; returns a summary line.

    The AdamW step is step number `step` (sets lr and bias correction) from zero moments.
    """
    train = TrainConfig.load(train_path) if train_path else TrainConfig()
    batch = Batch.load(batch_path)
    config, params = load_checkpoint(checkpoint)
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
    stats = Trainer(model, train, step - 1).apply(losses, grads, step)
    tensors |= {f"after.{n}": p for n, p in model.params.items()}
    save_file({n: np.ascontiguousarray(t) for n, t in tensors.items()}, str(out))
    return (f"wrote {out}: loss {stats.loss:.6f} (ce {stats.ce:.6f}, aux {stats.aux:.6f}), "
            f"grad norm {stats.grad_norm:.6f}, lr {stats.lr:.3e} at step {step}")
