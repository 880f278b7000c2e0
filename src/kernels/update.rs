//! A whole model's AdamW update as one threaded call.
//!
//! The update is one pass over every tensor's p, m, v (and g, where the
//! gradient is stored). Each tensor is cut into pieces — a block of dW rows
//! formed in cache for a factored gradient ([`super::outer`]), or
//! [`PIECE_LEN`] parameters of a stored one — and the intra-op threads claim
//! pieces from all tensors at once: one hand-off and one wait for the pass,
//! however many tensors, and a thread slowed by its neighbours takes fewer.
//! AdamW is elementwise and every block of dW is formed as on one thread, so
//! the result is the same to the bit for any thread count.

use super::outer::{self, Outer};
use super::threads;
use super::vector::{self, AdamWStep};

/// Parameters in one piece of a stored gradient (whole 16-lane vectors;
/// 448 KB of traffic, about a block of dW rows).
const PIECE_LEN: usize = 1 << 14;

/// Where one tensor's gradient is.
#[derive(Debug, Clone, Copy)]
pub enum TensorGrad<'a> {
    /// Written out, as long as the tensor.
    Stored(&'a [f32]),
    /// Kept as the factors of dW = dyᵀ·x (the tensor is dW's rows).
    Outer(Outer<'a>),
}

/// One tensor's AdamW step: its parameters, moments, gradient and constants.
#[derive(Debug)]
pub struct TensorStep<'a> {
    /// Parameters p.
    pub p: &'a mut [f32],
    /// First moment m.
    pub m: &'a mut [f32],
    /// Second moment v.
    pub v: &'a mut [f32],
    /// The gradient g.
    pub grad: TensorGrad<'a>,
    /// β, ε, learning rate, decay, clipping factor and bias corrections.
    pub step: AdamWStep,
}

/// One piece of a tensor: elements `index·len ..` of it (p, m, v already cut).
struct Piece<'a> {
    p: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    grad: TensorGrad<'a>,
    step: AdamWStep,
    index: usize,
    len: usize,
}

impl<'a> TensorStep<'a> {
    /// This tensor cut into pieces of whole dW-row blocks or [`PIECE_LEN`].
    fn pieces(self) -> impl Iterator<Item = Piece<'a>> + Send {
        let TensorStep {
            p,
            m,
            v,
            grad,
            step,
        } = self;
        assert!(m.len() == p.len() && v.len() == p.len());
        let len = match grad {
            TensorGrad::Stored(g) => {
                assert_eq!(g.len(), p.len(), "a gradient per parameter");
                PIECE_LEN
            }
            TensorGrad::Outer(product) => {
                assert_eq!(
                    product.out_rows() * product.x_width(),
                    p.len(),
                    "dW as large as W"
                );
                outer::block_rows(product.x_width()) * product.x_width()
            }
        }
        .max(1);
        let cut = p
            .chunks_mut(len)
            .zip(m.chunks_mut(len))
            .zip(v.chunks_mut(len));
        cut.enumerate().map(move |(index, ((p, m), v))| Piece {
            p,
            m,
            v,
            grad,
            step,
            index,
            len,
        })
    }
}

impl Piece<'_> {
    /// AdamW on this piece, its gradient read or formed in cache.
    fn run(self) {
        let Piece { p, m, v, step, .. } = self;
        let first = self.index * self.len;
        match self.grad {
            TensorGrad::Stored(g) => vector::adamw(p, &g[first..first + p.len()], m, v, step),
            TensorGrad::Outer(product) => {
                let inp = product.x_width();
                outer::with_block(product, product.plan(), first / inp, p.len() / inp, |g| {
                    vector::adamw(p, g, m, v, step)
                })
            }
        }
    }
}

/// One AdamW step (see [`vector::adamw`]) on every tensor of `tensors`,
/// pieces claimed by the intra-op threads across all of them:
///   g = the stored gradient, or dW[rows] = (dyᵀ·x)[rows] formed in cache
///   AdamW(p[piece], g, m[piece], v[piece])
pub fn adamw_tensors<'a>(tensors: impl Iterator<Item = TensorStep<'a>> + Send) {
    threads::for_each_claimed(tensors.flat_map(TensorStep::pieces), &|piece| piece.run());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::data;
    use crate::kernels::{Mat, MatMut, Write, matmul, set_threads};

    #[test]
    fn one_call_over_stored_and_factored_tensors_equals_adamw_on_each_stored_gradient() {
        // A factored weight of 40 blocks, a stored one of several pieces and
        // a short one, updated in one call.
        let (t, out, inp) = (8, 2560, 256);
        let (dy, x) = (data(t * out, 5), data(t * inp, 6));
        let product = Outer::new(Mat::new(&dy, t, out), Mat::new(&x, t, inp));
        let mut dw = vec![0.0; out * inp];
        let dw_mat = MatMut::new(&mut dw, out, inp);
        matmul(
            dw_mat,
            Mat::new(&dy, t, out).t(),
            Mat::new(&x, t, inp),
            Write::Overwrite,
        );
        let stored = data(3 * PIECE_LEN + 5, 7);
        let short = data(37, 8);
        let grads = [dw.as_slice(), &stored, &short];
        let step = AdamWStep {
            grad_scale: 0.7,
            decay: 1e-4,
            ..AdamWStep::new((0.9, 0.95), 1e-8, 1e-3, 2)
        };
        let start = |n: usize, seed: u32| {
            let v = data(n, seed + 20)
                .iter()
                .map(|v| v.abs())
                .collect::<Vec<_>>();
            (data(n, seed), data(n, seed + 10), v)
        };
        let init: Vec<_> = grads
            .iter()
            .zip(1..)
            .map(|(g, s)| start(g.len(), s))
            .collect();
        let mut want = init.clone();
        for ((p, m, v), g) in want.iter_mut().zip(grads) {
            vector::adamw(p, g, m, v, step);
        }
        // Other tests of this process set 2 threads too, and a call finding
        // the pool busy runs on its caller: either way, the same bits.
        set_threads(2);
        let mut got = init.clone();
        let kinds = [
            TensorGrad::Outer(product),
            TensorGrad::Stored(&stored),
            TensorGrad::Stored(&short),
        ];
        adamw_tensors(
            got.iter_mut()
                .zip(kinds)
                .map(|((p, m, v), grad)| TensorStep {
                    p,
                    m,
                    v,
                    grad,
                    step,
                }),
        );
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(bits(&g.0), bits(&w.0), "tensor {i}: p");
            assert_eq!(bits(&g.1), bits(&w.1), "tensor {i}: m");
            assert_eq!(bits(&g.2), bits(&w.2), "tensor {i}: v");
        }
    }
}
