"""The NumPy track's own checks: the hand-derived backward against central finite
differences (in float64, on a tiny config), the optimizer, sampling, generation
and the typed errors. Parity with the JAX reference is reference/parity's job."""

import json
import math
import tempfile
import unittest
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moe_np.config import ModelConfig, TrainConfig
from moe_np.errors import CheckpointError, ConfigError, InputError, NonFiniteError
from moe_np.model import Batch, Model
from moe_np.optim import Trainer, clip_scale, learning_rate
from moe_np.params import load_checkpoint, load_training
from moe_np.sampling import Greedy, Temperature, TopK, TopP, generate, pick_token

MICRO = dict(hidden_dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, n_experts=4, top_k=2,
             ffn_dim=6, vocab_size=13, max_seq_len=16, rope_base=10000.0, rope_alpha=2.0)


def micro_model(seed=3, dtype=np.float64, **overrides):
    model = Model.new(ModelConfig(**{**MICRO, **overrides}), seed)
    model.params = {n: p.astype(dtype) for n, p in model.params.items()}
    return model


def micro_batch(seed=0, batch=2, seq=5, vocab=13):
    rng = np.random.default_rng(seed)
    return Batch(rng.integers(0, vocab, (batch, seq)), rng.integers(0, vocab, (batch, seq)))


class GradientTest(unittest.TestCase):
    def test_every_parameter_matches_central_differences(self):
        model, batch, alpha = micro_model(), micro_batch(), 0.05
        losses, grads, _, routes = model.loss_and_grads(batch, alpha)
        rng = np.random.default_rng(1)
        eps = 1e-6
        for name, p in model.params.items():
            for i in rng.choice(p.size, size=min(4, p.size), replace=False):
                flat = p.reshape(-1)
                old = flat[i]
                flat[i] = old + eps
                up, _, _, routes_up = model.loss_and_grads(batch, alpha)
                flat[i] = old - eps
                down, _, _, routes_down = model.loss_and_grads(batch, alpha)
                flat[i] = old
                # The top-k choice has no gradient: a probe that flips a route is no test.
                same = all(np.array_equal(a, b) for a, b in zip(routes_up + routes_down, routes * 2))
                if not same:
                    continue
                numeric = (float(up.total) - float(down.total)) / (2 * eps)
                analytic = float(grads[name].reshape(-1)[i])
                self.assertAlmostEqual(analytic, numeric, delta=1e-6 + 1e-5 * abs(numeric), msg=f"{name}[{i}]")

    def test_the_aux_loss_reaches_the_router(self):
        # k < E: the balance term moves the router's gradient. k = E: f_e = 1/E for every
        # expert, so α·E·Σ_e f_e·P_e = α exactly, and it adds no gradient at all.
        batch = micro_batch()
        for top_k, moves in ((2, True), (4, False)):
            model = micro_model(top_k=top_k)
            g0 = model.loss_and_grads(batch, 0.0)[1]["layers.0.moe.router.weight"]
            losses, grads, _, _ = model.loss_and_grads(batch, 1.0)
            self.assertEqual(np.abs(grads["layers.0.moe.router.weight"] - g0).max() > 1e-8, moves)
            if not moves:
                self.assertAlmostEqual(float(losses.aux), 2.0)  # α per layer, two layers

    def test_an_idle_expert_gets_exactly_zero_gradient(self):
        model, batch = micro_model(n_experts=4, top_k=1), micro_batch(batch=1, seq=1)
        _, grads, _, routes = model.loss_and_grads(batch, 0.01)
        used = set(routes[0].ravel().tolist())
        idle = [e for e in range(4) if e not in used]
        self.assertEqual(len(idle), 3)
        for e in idle:
            for w in ("gate_proj", "up_proj", "down_proj"):
                self.assertFalse(np.any(grads[f"layers.0.moe.experts.{e}.{w}.weight"]))


class OptimizerTest(unittest.TestCase):
    def test_schedule_warms_up_then_decays_to_a_tenth(self):
        c = TrainConfig()
        for t, lr in ((1, 1e-4), (10, 1e-3), (605, 5.5e-4), (1200, 1e-4), (5000, 1e-4)):
            self.assertAlmostEqual(learning_rate(c, t), lr, delta=1e-9)

    def test_clipping_only_above_the_threshold(self):
        self.assertEqual(clip_scale(0.5, 1.0), 1.0)
        self.assertAlmostEqual(clip_scale(4.0, 1.0), 1 / 4.000001)
        self.assertEqual(clip_scale(4.0, 0.0), 1.0)

    def test_training_lowers_the_loss_and_is_deterministic(self):
        def run():
            trainer = Trainer(micro_model(dtype=np.float32), TrainConfig(lr=1e-2, warmup_steps=1))
            return [trainer.train_step(micro_batch()).loss for _ in range(15)]
        first, second = run(), run()
        self.assertEqual(first, second)
        self.assertLess(first[-1], first[0] - 0.5)

    def test_a_non_finite_gradient_refuses_the_step(self):
        model = micro_model(dtype=np.float32)
        trainer = Trainer(model, TrainConfig())
        model.params["lm_head.weight"][0, 0] = np.nan
        before = {n: p.copy() for n, p in model.params.items()}
        with self.assertRaises(NonFiniteError):
            trainer.train_step(micro_batch())
        self.assertEqual(trainer.step, 0)
        for n, p in model.params.items():
            np.testing.assert_array_equal(p, before[n])


class SamplingTest(unittest.TestCase):
    def test_greedy_ties_and_degenerate_filters(self):
        rng = np.random.default_rng(0)
        logits = np.array([1.0, 3.0, 3.0, -1.0], np.float32)
        self.assertEqual(pick_token(logits, Greedy(), rng), 1)
        self.assertEqual(pick_token(logits, Temperature(0.0), rng), 1)
        self.assertEqual(pick_token(logits, TopK(1, 1.0), rng), 1)
        self.assertEqual(pick_token(logits, TopP(1e-6, 1.0), rng), 1)

    def test_top_p_keeps_the_crossing_token(self):
        logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
        seen = {pick_token(logits, TopP(0.6, 1.0), np.random.default_rng(s)) for s in range(200)}
        self.assertEqual(seen, {0, 1})

    def test_temperature_sampling_follows_the_distribution(self):
        logits = np.log(np.array([0.7, 0.2, 0.1], np.float32))
        rng = np.random.default_rng(5)
        counts = np.bincount([pick_token(logits, Temperature(1.0), rng) for _ in range(4000)], minlength=3)
        np.testing.assert_allclose(counts / 4000, [0.7, 0.2, 0.1], atol=0.03)

    def test_cached_generation_matches_full_recompute(self):
        model = micro_model(dtype=np.float32)
        tokens = generate(model, [1, 2, 3], 9, Greedy(), 0)
        self.assertEqual(len(tokens), 9)
        for n in range(3, 9):
            full = model.forward(np.asarray([tokens[:n]]))[0, -1]
            self.assertEqual(int(np.argmax(full)), tokens[n])
        self.assertEqual(generate(model, [1], 8, TopK(5, 0.9), 7), generate(model, [1], 8, TopK(5, 0.9), 7))

    def test_generation_slides_its_window_past_max_seq_len(self):
        # max_seq_len 16: each token is the greedy choice of a plain forward over the
        # (at most) 16 tokens before it — from a short prompt (cached, then sliding)
        # and from a prompt longer than the window (cut from the left).
        model = micro_model(dtype=np.float32)
        window = model.config.max_seq_len
        for prompt in ([1, 2, 3], list(np.arange(20) % 13)):
            tokens = generate(model, prompt, 40, Greedy(), 0)
            self.assertEqual(tokens[:len(prompt)], [int(t) for t in prompt])
            self.assertEqual(len(tokens), 40)
            for n in range(len(prompt), 40):
                full = model.forward(np.asarray([tokens[max(0, n - window):n]]))[0, -1]
                self.assertEqual(int(np.argmax(full)), tokens[n], f"token {n}")


class ErrorTest(unittest.TestCase):
    def test_bad_inputs_are_typed_errors(self):
        model = micro_model(dtype=np.float32)
        with self.assertRaises(InputError):
            model.forward(np.array([[13]]))
        with self.assertRaises(InputError):
            model.forward(np.zeros((1, 17), np.int64))
        with self.assertRaises(InputError):
            model.forward(np.zeros((1, 0), np.int64))
        with self.assertRaises(InputError):
            Batch.from_rows([[1, 2], [3]], [[1, 2], [3, 4]])
        with self.assertRaises(InputError):
            model.loss_and_grads(Batch(np.array([[1]]), np.array([[99]])), 0.01)
        for bad in (Temperature(-1.0), TopK(14, 1.0), TopP(0.0, 1.0), TopP(1.5, 1.0)):
            with self.assertRaises(InputError):
                pick_token(np.zeros(13, np.float32), bad, np.random.default_rng(0))
        with self.assertRaises(InputError):
            generate(model, [], 4, Greedy(), 0)
        with self.assertRaises(InputError):
            generate(model, [1, 2, 3], 2, Greedy(), 0)

    def test_bad_configs_are_typed_errors(self):
        for change in ({"n_heads": 3}, {"top_k": 5}, {"hidden_dim": 0}, {"head_dim": 3, "hidden_dim": 12}, {"n_kv_heads": 3},
                       {"rope_base": float("nan")}, {"colour": 1}):
            with self.assertRaises(ConfigError, msg=str(change)):
                ModelConfig.from_dict({**MICRO, **change})
        with self.assertRaises(ConfigError):
            TrainConfig.from_dict({"beta1": 1.0})
        with self.assertRaises(ConfigError):
            TrainConfig.from_dict({"lr": "fast"})

    def test_bad_checkpoints_are_typed_errors(self):
        model = micro_model(dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "config.json").write_text(json.dumps(MICRO))
            with self.assertRaises(CheckpointError):
                load_checkpoint(d)  # no model.safetensors
            tensors = dict(model.params)
            save_file(tensors, str(d / "model.safetensors"))
            config, params = load_checkpoint(d)
            self.assertEqual(config, model.config)
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[: len(data) // 2])
            with self.assertRaises(CheckpointError):
                load_checkpoint(d)
            del tensors["lm_head.weight"]
            save_file(tensors, str(d / "model.safetensors"))
            with self.assertRaises(CheckpointError):
                load_checkpoint(d)


def save_training(directory, trainer, step_tags=None):
    """What `moe train` saves (CONTRACT §9), by hand: config.json, model.safetensors,
    optimizer.safetensors (`<name>.m` / `<name>.v`) and state.json; each safetensors
    file records a step (the trainer's unless `step_tags` gives one per file)."""
    d, step = Path(directory), trainer.step
    tags = step_tags or {"model": step, "optimizer": step}
    (d / "config.json").write_text(json.dumps(trainer.model.config.to_dict()))
    save_file(dict(trainer.model.params), str(d / "model.safetensors"), metadata={"step": str(tags["model"])})
    moments = {f"{n}.{k}": x[n] for k, x in (("m", trainer.optimizer.m), ("v", trainer.optimizer.v)) for n in x}
    save_file(moments, str(d / "optimizer.safetensors"), metadata={"step": str(tags["optimizer"])})
    state = {"step": step, "train": trainer.train.__dict__, "data": None}
    (d / "state.json").write_text(json.dumps(state))


class TrainingCheckpointTest(unittest.TestCase):
    def test_resuming_a_saved_run_equals_never_stopping(self):
        train = TrainConfig(lr=1e-2, warmup_steps=1, beta2=0.999, weight_decay=0.05)
        straight = Trainer(micro_model(dtype=np.float32), train)
        for seed in range(3):
            straight.train_step(micro_batch(seed))
        first = Trainer(micro_model(dtype=np.float32), train)
        first.train_step(micro_batch(0))
        first.train_step(micro_batch(1))
        with tempfile.TemporaryDirectory() as tmp:
            save_training(tmp, first)
            config, params, moments, step, saved = load_training(tmp)
        self.assertEqual((config, step, saved), (first.model.config, 2, train))
        resumed = Trainer(Model(config, params), saved, step, moments)
        resumed.train_step(micro_batch(2))
        for name, p in straight.model.params.items():
            np.testing.assert_array_equal(resumed.model.params[name], p, err_msg=name)
            np.testing.assert_array_equal(resumed.optimizer.v[name], straight.optimizer.v[name], err_msg=name)

    def test_bad_training_checkpoints_are_typed_errors(self):
        trainer = Trainer(micro_model(dtype=np.float32), TrainConfig())
        trainer.train_step(micro_batch())
        name = "layers.0.moe.router.weight"
        breakages = {
            "files from different saves": lambda d: save_training(d, trainer, {"model": 1, "optimizer": 0}),
            "unknown state key": lambda d: (d / "state.json").write_text('{"step": 1, "train": {}, "epoch": 3}'),
            "invalid settings": lambda d: (d / "state.json").write_text('{"step": 1, "train": {"beta2": 1.5}}'),
            "negative step": lambda d: (d / "state.json").write_text('{"step": -1, "train": {}}'),
            "no optimizer": lambda d: (d / "optimizer.safetensors").unlink(),
            "missing moment": lambda d: save_file({f"{name}.m": trainer.optimizer.m[name]},
                                                  str(d / "optimizer.safetensors"), metadata={"step": "1"}),
            "negative v": lambda d: (trainer.optimizer.v[name].__setitem__((0, 0), -1.0), save_training(d, trainer)),
        }
        for what, breakage in breakages.items():
            with tempfile.TemporaryDirectory() as tmp:
                save_training(tmp, trainer)
                load_training(tmp)
                breakage(Path(tmp))
                with self.assertRaises(CheckpointError, msg=what):
                    load_training(tmp)


if __name__ == "__main__":
    unittest.main()
