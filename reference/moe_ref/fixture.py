"""Writes the golden fixture checked by `cargo test` (tests/golden.rs).

A small GQA + NTK-RoPE model, its weights (from `moe init`), one batch, and
the reference's outputs computed in float64 — the truth our float32 code is
compared against on machines without Python:

    python -m moe_ref.fixture --moe target/release/moe --out tests/fixtures/gqa_ntk
"""

import argparse
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from . import model as ref

CONFIG = {
    "hidden_dim": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 4,
    "n_experts": 4, "top_k": 2, "ffn_dim": 32, "vocab_size": 64, "max_seq_len": 16,
    "rope_base": 10000.0, "rope_alpha": 2.0,
}
SEED, BATCH, SEQ, STEP = 11, 2, 6, 3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe", default="target/release/moe")
    parser.add_argument("--out", default="tests/fixtures/gqa_ntk")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-config.json").write_text(json.dumps(CONFIG, indent=2))
    subprocess.run([args.moe, "init", "--config", out / "model-config.json", "--seed", str(SEED),
                    "--out", out, "--force"], check=True, capture_output=True)
    (out / "model-config.json").unlink()

    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ))
    targets = rng.integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ))
    (out / "batch.json").write_text(json.dumps({"ids": ids.tolist(), "targets": targets.tolist()}))
    train = {**ref.DEFAULT_TRAIN, "aux_loss_alpha": 0.1}
    (out / "train.json").write_text(json.dumps(train, indent=2))

    config, params = ref.load_checkpoint(out, np.float64)
    (total, (ce, aux, logits, routes)), grads = ref.loss_and_grads(params, config, ids, targets, train["aux_loss_alpha"])
    after, _, _ = ref.adamw_step(params, grads, STEP, train)
    tensors = {
        "logits": np.asarray(logits),
        "loss.ce": np.asarray([ce]),
        "loss.aux": np.asarray([aux]),
        "loss.total": np.asarray([total]),
        "adamw.step": np.asarray([STEP], np.int32),
    }
    tensors.update({f"route.{l}": np.asarray(r, np.int32) for l, r in enumerate(routes)})
    tensors.update({f"grad.{n}": np.asarray(g) for n, g in grads.items()})
    tensors.update({f"after.{n}": np.asarray(p) for n, p in after.items()})
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "reference.safetensors")
    (out / "reference.safetensors").chmod(0o644)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
