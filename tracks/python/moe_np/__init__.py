"""rosetta-moe in NumPy: the model of docs/CONTRACT.md §2–§7 with a backward
derived by hand (no autograd), AdamW, sampling and KV-cached generation.

Every array is float32 and row-major, as in the Rust crate; every function
pair `*_forward` / `*_backward` carries its formula and its shapes.
"""
