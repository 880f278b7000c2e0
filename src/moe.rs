//! The mixture-of-experts sublayer: router softmax, top-k choice, renormalised
//! gates, SwiGLU experts, and the load-balancing loss (CONTRACT §3–§5).
//!
//! Tokens are dispatched by a counting sort: the T·k (token, slot) pairs are
//! grouped by expert into contiguous rows, so each expert is a few matrix
//! multiplies over exactly the tokens routed to it. No capacity limit, no drops.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::kernels::{self, Write};
use crate::layers::{Linear, Weights};
use crate::params::{ExpertRanges, Grads, LayerRanges};

/// The sizes the MoE sublayer needs.
#[derive(Debug, Clone, Copy)]
pub struct MoeDims {
    /// Width h.
    pub hidden: usize,
    /// Experts E.
    pub n_experts: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Expert hidden size F.
    pub ffn: usize,
}

impl MoeDims {
    /// The MoE sizes of `config`.
    pub fn new(config: &ModelConfig) -> Self {
        MoeDims {
            hidden: config.hidden_dim,
            n_experts: config.n_experts,
            top_k: config.top_k,
            ffn: config.ffn_dim,
        }
    }
}

/// Everything the MoE forward computes for T tokens and backward reuses.
#[derive(Debug, Default, Clone)]
pub struct MoeActs {
    /// The sublayer's input, RMSNorm_moe(x) [T, h].
    pub xn: Vec<f32>,
    /// Router probabilities p = softmax(x·W_rᵀ) [T, E].
    pub probs: Vec<f32>,
    /// P_e = mean_t p_{t,e} [E].
    pub mean_probs: Vec<f32>,
    /// Chosen experts [T, k], in descending probability.
    pub experts: Vec<u32>,
    /// Renormalised gates w [T, k].
    pub gates: Vec<f32>,
    /// Top-k slots given to each expert [E].
    pub counts: Vec<usize>,
    /// First dispatched row of each expert [E + 1].
    pub offsets: Vec<usize>,
    /// Dispatched row of slot (t, j) [T·k].
    pub slot_row: Vec<usize>,
    /// Token of each dispatched row [T·k].
    pub row_token: Vec<usize>,
    /// Expert inputs, gathered by row [T·k, h].
    pub xe: Vec<f32>,
    /// Gate and up pre-activations [T·k, 2F] (gate in columns 0..F, up in F..2F).
    pub gate_up: Vec<f32>,
    /// silu(gate) ⊙ up [T·k, F].
    pub act: Vec<f32>,
    /// Expert outputs E_e(x_t) [T·k, h].
    pub ye: Vec<f32>,
}

impl MoeActs {
    /// Sizes every buffer for `tokens` tokens (allocates only when growing).
    pub fn plan(&mut self, tokens: usize, dims: MoeDims) {
        let slots = tokens * dims.top_k;
        self.xn.resize(tokens * dims.hidden, 0.0);
        self.probs.resize(tokens * dims.n_experts, 0.0);
        self.mean_probs.resize(dims.n_experts, 0.0);
        self.experts.resize(slots, 0);
        self.gates.resize(slots, 0.0);
        self.counts.resize(dims.n_experts, 0);
        self.offsets.resize(dims.n_experts + 1, 0);
        self.slot_row.resize(slots, 0);
        self.row_token.resize(slots, 0);
        self.xe.resize(slots * dims.hidden, 0.0);
        self.gate_up.resize(slots * 2 * dims.ffn, 0.0);
        self.act.resize(slots * dims.ffn, 0.0);
        self.ye.resize(slots * dims.hidden, 0.0);
    }

    /// Σ_e f_e · P_e of the last forward (CONTRACT §4), with
    /// f_e = (top-k slots given to e)/(T·k). The layer's aux loss is α·E times this.
    pub fn balance(&self) -> f32 {
        let slots: usize = self.counts.iter().sum();
        self.counts
            .iter()
            .zip(&self.mean_probs)
            .map(|(&c, &p)| c as f32 / slots as f32 * p)
            .sum()
    }
}

/// Scratch for the MoE backward, sized like [`MoeActs`].
#[derive(Debug, Default, Clone)]
pub struct MoeScratch {
    /// dL/dw for every gate [T, k].
    dgates: Vec<f32>,
    /// dL/dp [E] for one token.
    dprobs: Vec<f32>,
    /// dL/d(router logits) [T, E].
    drouter: Vec<f32>,
    /// dL/d(expert output) [T·k, h].
    dye: Vec<f32>,
    /// dL/d(act) [T·k, F].
    dact: Vec<f32>,
    /// dL/d(gate|up pre-activations) [T·k, 2F].
    dgate_up: Vec<f32>,
    /// dL/d(expert input) [T·k, h].
    dxe: Vec<f32>,
}

impl MoeScratch {
    /// Sizes every buffer for `tokens` tokens.
    pub fn plan(&mut self, tokens: usize, dims: MoeDims) {
        let slots = tokens * dims.top_k;
        self.dgates.resize(slots, 0.0);
        self.dprobs.resize(dims.n_experts, 0.0);
        self.drouter.resize(tokens * dims.n_experts, 0.0);
        self.dye.resize(slots * dims.hidden, 0.0);
        self.dact.resize(slots * dims.ffn, 0.0);
        self.dgate_up.resize(slots * 2 * dims.ffn, 0.0);
        self.dxe.resize(slots * dims.hidden, 0.0);
    }
}

/// Top-k choice, gates and the dispatch plan from `acts.probs` [T, E].
/// Ties go to the lower expert index; slots are in descending probability.
fn route(acts: &mut MoeActs, tokens: usize, dims: MoeDims) {
    let (n_experts, k) = (dims.n_experts, dims.top_k);
    acts.counts.fill(0);
    acts.mean_probs.fill(0.0);
    for t in 0..tokens {
        let p = &acts.probs[t * n_experts..(t + 1) * n_experts];
        // P_e = (1/T)·Σ_t p_{t,e} (the division follows the loop).
        for (m, &pe) in acts.mean_probs.iter_mut().zip(p) {
            *m += pe;
        }
        // Top-k: the j-th pick is the most probable expert not yet taken.
        let chosen = &mut acts.experts[t * k..(t + 1) * k];
        for j in 0..k {
            let mut best: Option<usize> = None;
            for e in 0..n_experts {
                let taken = chosen[..j].contains(&(e as u32));
                if !taken && best.is_none_or(|b| p[e] > p[b]) {
                    best = Some(e);
                }
            }
            let e = best.expect("k ≤ E leaves an expert to choose");
            chosen[j] = e as u32;
            acts.counts[e] += 1;
        }
        // w_j = p_{e_j} / Σ_j' p_{e_j'}
        let kept: f32 = chosen.iter().map(|&e| p[e as usize]).sum();
        for (w, &e) in acts.gates[t * k..(t + 1) * k].iter_mut().zip(chosen.iter()) {
            *w = p[e as usize] / kept;
        }
    }
    for m in acts.mean_probs.iter_mut() {
        *m /= tokens as f32;
    }
    // Counting sort of the T·k slots by expert: rows of expert e are offsets[e]..offsets[e+1].
    acts.offsets[0] = 0;
    for e in 0..n_experts {
        acts.offsets[e + 1] = acts.offsets[e] + acts.counts[e];
    }
    // Walk the slots in token order, using `counts` as each expert's fill cursor.
    acts.counts.fill(0);
    for slot in 0..tokens * k {
        let e = acts.experts[slot] as usize;
        let row = acts.offsets[e] + acts.counts[e];
        acts.counts[e] += 1;
        acts.slot_row[slot] = row;
        acts.row_token[row] = slot / k;
    }
}

/// One layer's router `moe.router.weight` [E, h]: softmax, top-k, gates.
#[derive(Debug, Clone)]
pub struct Router<'a> {
    /// W_r [E, h].
    pub weight: Linear<'a>,
    /// The MoE sizes.
    pub dims: MoeDims,
}

impl Router<'_> {
    /// p_t = softmax(xn_t · W_rᵀ) [T, E] into `acts.probs`, then the top-k
    /// choice, the gates and the dispatch plan (see `route`).
    pub fn forward(&self, acts: &mut MoeActs, tokens: usize) {
        let n_experts = self.dims.n_experts;
        let probs = &mut acts.probs[..tokens * n_experts];
        let xn = &acts.xn[..tokens * self.dims.hidden];
        self.weight.forward(probs, xn, Write::Overwrite);
        for row in probs.chunks_exact_mut(n_experts) {
            kernels::softmax_in_place(row);
        }
        route(acts, tokens, self.dims);
    }

    /// dxn [T, h] += the router's share of dL/dxn, dW_r into `grads`, from
    /// dL/dgates (`scratch.dgates`, written by the combine backward) and the
    /// aux loss α·E·Σ_e f_e·P_e (f held constant):
    ///   through the gates, for i in top-k:  dp_i = (dw_i − Σ_j w_j dw_j) / Σ_j p_{e_j}
    ///   through the aux loss:               dp_{t,e} += α·E·f_e / T
    ///   softmax:                            dr_{t,e} = p_e · (dp_e − Σ_e' p_e' dp_e')
    pub fn backward(
        &self,
        dxn: &mut [f32],
        acts: &MoeActs,
        scratch: &mut MoeScratch,
        grads: &mut Grads<'_>,
        aux_alpha: f32,
    ) {
        let (k, n_experts) = (self.dims.top_k, self.dims.n_experts);
        let tokens = dxn.len() / self.dims.hidden;
        let slots = (tokens * k) as f32;
        let aux_scale = aux_alpha * n_experts as f32 / tokens as f32;
        for t in 0..tokens {
            let p = &acts.probs[t * n_experts..(t + 1) * n_experts];
            let chosen = &acts.experts[t * k..(t + 1) * k];
            let gates = &acts.gates[t * k..(t + 1) * k];
            let dgates = &scratch.dgates[t * k..(t + 1) * k];
            let dp = &mut scratch.dprobs;
            // Aux loss: dp_e = α·E/T · f_e, f_e = counts_e/(T·k).
            for (dp, &c) in dp.iter_mut().zip(&acts.counts) {
                *dp = aux_scale * (c as f32 / slots);
            }
            // Gates: dp_{e_i} += (dw_i − Σ_j w_j·dw_j) / Σ_j p_{e_j}.
            let kept: f32 = chosen.iter().map(|&e| p[e as usize]).sum();
            let w_dot_dw = kernels::dot(gates, dgates);
            for (&e, &dw) in chosen.iter().zip(dgates) {
                dp[e as usize] += (dw - w_dot_dw) / kept;
            }
            // Softmax: dr_e = p_e·(dp_e − Σ_e' p_e'·dp_e').
            let p_dot_dp = kernels::dot(p, dp);
            let dr = &mut scratch.drouter[t * n_experts..(t + 1) * n_experts];
            for ((dr, &p), &dp) in dr.iter_mut().zip(p).zip(dp.iter()) {
                *dr = p * (dp - p_dot_dp);
            }
        }
        // r = xn·W_rᵀ: dW_r = drᵀ·xn, dxn += dr·W_r.
        let dr = &scratch.drouter[..tokens * n_experts];
        let xn = &acts.xn[..dxn.len()];
        self.weight.backward(dxn, dr, xn, Write::Accumulate, grads);
    }
}

/// One SwiGLU expert: `gate_proj` and `up_proj` (stacked) and `down_proj`.
///   E(x) = W_down · (silu(W_gate · x) ⊙ (W_up · x))
#[derive(Debug, Clone)]
pub struct Expert<'a> {
    /// `gate_proj` [F, h] then `up_proj` [F, h]: one [2F, h] matrix.
    pub gate_up_proj: Linear<'a>,
    /// `down_proj` [h, F].
    pub down_proj: Linear<'a>,
    /// h.
    pub hidden: usize,
    /// F.
    pub ffn: usize,
}

impl Expert<'_> {
    /// The expert on its dispatched `rows` of `acts`: xe → gate|up → act → ye.
    pub fn forward(&self, acts: &mut MoeActs, rows: Range<usize>) {
        let (h, f) = (self.hidden, self.ffn);
        let gate_up = &mut acts.gate_up[rows.start * 2 * f..rows.end * 2 * f];
        let xe = &acts.xe[rows.start * h..rows.end * h];
        self.gate_up_proj.forward(gate_up, xe, Write::Overwrite);
        // act = silu(gate) ⊙ up
        let act = &mut acts.act[rows.start * f..rows.end * f];
        kernels::swiglu_forward(act, gate_up, f);
        let ye = &mut acts.ye[rows.start * h..rows.end * h];
        self.down_proj.forward(ye, act, Write::Overwrite);
    }

    /// Backward over its `rows`: dye → dact → dgate|up → dxe (in `scratch`),
    /// dW_down and dW_gate|up into `grads` (zero when no token chose it).
    pub fn backward(
        &self,
        scratch: &mut MoeScratch,
        acts: &MoeActs,
        rows: Range<usize>,
        grads: &mut Grads<'_>,
    ) {
        let (h, f) = (self.hidden, self.ffn);
        let dact = &mut scratch.dact[rows.start * f..rows.end * f];
        let dye = &scratch.dye[rows.start * h..rows.end * h];
        let act = &acts.act[rows.start * f..rows.end * f];
        self.down_proj
            .backward(dact, dye, act, Write::Overwrite, grads);
        let dgate_up = &mut scratch.dgate_up[rows.start * 2 * f..rows.end * 2 * f];
        let saved = &acts.gate_up[rows.start * 2 * f..rows.end * 2 * f];
        kernels::swiglu_backward(dgate_up, dact, saved, f);
        let dxe = &mut scratch.dxe[rows.start * h..rows.end * h];
        let xe = &acts.xe[rows.start * h..rows.end * h];
        self.gate_up_proj
            .backward(dxe, dgate_up, xe, Write::Overwrite, grads);
    }
}

/// One layer's MoE block: the router and the experts.
#[derive(Debug, Clone)]
pub struct MoeBlock<'a> {
    /// `moe.router`.
    pub router: Router<'a>,
    /// `moe.experts.*`, as ranges (see [`MoeBlock::expert`]).
    experts: &'a [ExpertRanges],
    /// Where the experts' weights are read.
    weights: Weights<'a>,
}

impl<'a> MoeBlock<'a> {
    /// The MoE block of the layer at `ranges`.
    pub fn new(weights: Weights<'a>, ranges: &'a LayerRanges, dims: MoeDims) -> Self {
        let router = Router {
            weight: Linear::new(weights, &ranges.router, dims.n_experts, dims.hidden),
            dims,
        };
        MoeBlock {
            router,
            experts: &ranges.experts,
            weights,
        }
    }

    /// Expert `e` (`moe.experts.{e}`).
    pub fn expert(&self, e: usize) -> Expert<'a> {
        let (dims, ranges) = (self.router.dims, &self.experts[e]);
        let (h, f) = (dims.hidden, dims.ffn);
        Expert {
            gate_up_proj: Linear::new(self.weights, &ranges.gate_up, 2 * f, h),
            down_proj: Linear::new(self.weights, &ranges.down, h, f),
            hidden: h,
            ffn: f,
        }
    }

    /// out [T, h] += MoE(acts.xn):
    ///   p_t = softmax(xn_t · W_rᵀ);  top-k experts e_{t,1..k} by p;  w_{t,j} = p_{t,e_j} / Σ_j' p_{t,e_j'}
    ///   out_t += Σ_j w_{t,j} · E_{e_j}(xn_t)
    pub fn forward(&self, out: &mut [f32], acts: &mut MoeActs) {
        let (h, k) = (self.router.dims.hidden, self.router.dims.top_k);
        let tokens = out.len() / h;
        self.router.forward(acts, tokens);
        for (row, &t) in acts.row_token.iter().enumerate() {
            acts.xe[row * h..(row + 1) * h].copy_from_slice(&acts.xn[t * h..(t + 1) * h]);
        }
        for e in 0..self.experts.len() {
            let rows = acts.offsets[e]..acts.offsets[e + 1];
            if !rows.is_empty() {
                self.expert(e).forward(acts, rows);
            }
        }
        // out_t += Σ_j w_{t,j} · ye[row(t, j)]
        for (t, out_t) in out.chunks_exact_mut(h).enumerate() {
            for slot in t * k..(t + 1) * k {
                let row = acts.slot_row[slot];
                kernels::axpy(out_t, acts.gates[slot], &acts.ye[row * h..(row + 1) * h]);
            }
        }
    }

    /// Backward from dout [T, h] = dL/d(the block's output): dxn [T, h] =
    /// dL/d(acts.xn) (overwritten); every expert's and the router's weight
    /// gradients into `grads`, in that order.
    pub fn backward(
        &self,
        dxn: &mut [f32],
        dout: &[f32],
        acts: &MoeActs,
        scratch: &mut MoeScratch,
        grads: &mut Grads<'_>,
        aux_alpha: f32,
    ) {
        let (h, k) = (self.router.dims.hidden, self.router.dims.top_k);
        combine_backward(scratch, dout, acts, h, k);
        for e in 0..self.experts.len() {
            let rows = acts.offsets[e]..acts.offsets[e + 1];
            self.expert(e).backward(scratch, acts, rows, grads);
        }
        // dxn_t = Σ_j dxe[row(t, j)]   (the expert path)
        for (t, dxn_t) in dxn.chunks_exact_mut(h).enumerate() {
            dxn_t.fill(0.0);
            for &row in &acts.slot_row[t * k..(t + 1) * k] {
                kernels::add_assign(dxn_t, &scratch.dxe[row * h..(row + 1) * h]);
            }
        }
        self.router.backward(dxn, acts, scratch, grads, aux_alpha);
    }
}

/// Backward of the combine out_t = Σ_j w_{t,j} · E_{e_j}(xn_t), from dout [T, h]:
///   dw_{t,j} = dout_t · E_{e_j}(xn_t)   → scratch.dgates [T, k]
///   dE_{e_j}(xn_t) = w_{t,j} · dout_t  → scratch.dye [T·k, h], by dispatched row
fn combine_backward(scratch: &mut MoeScratch, dout: &[f32], acts: &MoeActs, h: usize, k: usize) {
    for slot in 0..dout.len() / h * k {
        let (t, row) = (slot / k, acts.slot_row[slot]);
        let dout_t = &dout[t * h..(t + 1) * h];
        scratch.dgates[slot] = kernels::dot(dout_t, &acts.ye[row * h..(row + 1) * h]);
        let dye = &mut scratch.dye[row * h..(row + 1) * h];
        for (d, &g) in dye.iter_mut().zip(dout_t) {
            *d = acts.gates[slot] * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_top_k_in_order_with_ties_to_lower_index() {
        let dims = MoeDims {
            hidden: 1,
            n_experts: 4,
            top_k: 2,
            ffn: 1,
        };
        let mut acts = MoeActs::default();
        acts.plan(2, dims);
        acts.probs = vec![0.1, 0.4, 0.1, 0.4, 0.7, 0.1, 0.15, 0.05];
        route(&mut acts, 2, dims);
        assert_eq!(acts.experts, [1, 3, 0, 2]);
        assert!((acts.gates[0] - 0.5).abs() < 1e-6);
        assert!((acts.gates[2] - 0.7 / 0.85).abs() < 1e-6);
        assert_eq!(acts.offsets, [0, 1, 2, 3, 4]);
        assert_eq!(acts.row_token, [1, 0, 1, 0]);
        // f = [1, 1, 1, 1]/4, P = [0.4, 0.25, 0.125, 0.225]: Σ f·P = 0.25
        assert!((acts.balance() - 0.25).abs() < 1e-6);
    }
}
