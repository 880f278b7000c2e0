"""rosetta-moe's independent reference: CONTRACT §3, §4 and §6 in JAX.

Gradients come from jax.grad, never from hand-written backward code; this
package is the executable specification the Rust implementation is checked
against.
"""
