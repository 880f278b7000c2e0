//! The mixture-of-experts sublayer: router softmax, top-k choice, renormalised
//! gates, SwiGLU experts, and the load-balancing loss (CONTRACT §3–§5).
//!
//! Tokens are dispatched by a counting sort: the T·k (token, slot) pairs are
//! grouped by expert into contiguous rows, so each expert is a few matrix
//! multiplies over exactly the tokens routed to it. No capacity limit, no drops.

use crate::config::ModelConfig;
use crate::kernels::{self, Write};
use crate::layers::{self, Weights};
use crate::params::LayerRanges;

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
    dlogits: Vec<f32>,
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
        self.dlogits.resize(tokens * dims.n_experts, 0.0);
        self.dye.resize(slots * dims.hidden, 0.0);
        self.dact.resize(slots * dims.ffn, 0.0);
        self.dgate_up.resize(slots * 2 * dims.ffn, 0.0);
        self.dxe.resize(slots * dims.hidden, 0.0);
    }
}

/// MoE forward for T tokens.
/// xn [T, h] (normalised input) → out [T, h] (**added to**, the residual), acts (saved).
///   p_t = softmax(xn_t · W_rᵀ);  top-k experts e_{t,1..k} by p;  w_{t,j} = p_{t,e_j} / Σ_j' p_{t,e_j'}
///   E_e(x) = W_down,e · (silu(W_gate,e · x) ⊙ (W_up,e · x))
///   out_t += Σ_j w_{t,j} · E_{e_j}(xn_t)
pub fn moe_forward(
    out: &mut [f32],
    acts: &mut MoeActs,
    xn: &[f32],
    weights: Weights<'_>,
    ranges: &LayerRanges,
    tokens: usize,
    dims: MoeDims,
) {
    let (h, f) = (dims.hidden, dims.ffn);
    let probs = &mut acts.probs[..tokens * dims.n_experts];
    let router = weights.linear(ranges.router.clone());
    layers::linear_forward(
        probs,
        xn,
        router,
        tokens,
        h,
        dims.n_experts,
        Write::Overwrite,
    );
    for row in probs.chunks_exact_mut(dims.n_experts) {
        kernels::softmax_in_place(row);
    }
    route(acts, tokens, dims);
    for (row, &t) in acts.row_token.iter().enumerate() {
        acts.xe[row * h..(row + 1) * h].copy_from_slice(&xn[t * h..(t + 1) * h]);
    }
    for (e, expert) in ranges.experts.iter().enumerate() {
        let rows = acts.offsets[e]..acts.offsets[e + 1];
        let n = rows.len();
        if n == 0 {
            continue;
        }
        let gate_up = &mut acts.gate_up[rows.start * 2 * f..rows.end * 2 * f];
        let xe = &acts.xe[rows.start * h..rows.end * h];
        let w = weights.linear(expert.gate_up.clone());
        layers::linear_forward(gate_up, xe, w, n, h, 2 * f, Write::Overwrite);
        let act = &mut acts.act[rows.start * f..rows.end * f];
        kernels::swiglu_forward(act, gate_up, f);
        let ye = &mut acts.ye[rows.start * h..rows.end * h];
        let w = weights.linear(expert.down.clone());
        layers::linear_forward(ye, act, w, n, f, h, Write::Overwrite);
    }
    for t in 0..tokens {
        let out_t = &mut out[t * h..(t + 1) * h];
        for j in 0..dims.top_k {
            let row = acts.slot_row[t * dims.top_k + j];
            kernels::axpy(
                out_t,
                acts.gates[t * dims.top_k + j],
                &acts.ye[row * h..(row + 1) * h],
            );
        }
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
        for (m, &pe) in acts.mean_probs.iter_mut().zip(p) {
            *m += pe;
        }
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

/// MoE backward for T tokens.
/// dout [T, h] (gradient of the sublayer's output), xn [T, h], acts → dxn [T, h]
/// (overwritten), and the router's and every expert's weight gradients in `grads`
/// (overwritten; an expert with no token gets exactly zero). Returns Σ g² over
/// those gradients, each summed right after it is written.
///   dw_{t,j} = dout_t · E_{e_j}(xn_t);   dE_{e_j}(xn_t) = w_{t,j} · dout_t
///   through the gates, for i in top-k:  dp_i = (dw_i − Σ_j w_j dw_j) / Σ_j p_{e_j}
///   through the aux loss (α·E·Σ_e f_e P_e, f constant):  dp_{t,e} += α·E·f_e / T
///   router softmax:  dr_{t,e} = p_e · (dp_e − Σ_e' p_e' dp_e')
#[allow(clippy::too_many_arguments)]
pub fn moe_backward(
    dxn: &mut [f32],
    grads: &mut [f32],
    scratch: &mut MoeScratch,
    dout: &[f32],
    xn: &[f32],
    acts: &MoeActs,
    params: &[f32],
    ranges: &LayerRanges,
    tokens: usize,
    aux_alpha: f32,
    dims: MoeDims,
) -> f64 {
    let (h, f, k, n_experts) = (dims.hidden, dims.ffn, dims.top_k, dims.n_experts);
    let mut sum_sq = 0.0;
    for slot in 0..tokens * k {
        let (t, row) = (slot / k, acts.slot_row[slot]);
        let dout_t = &dout[t * h..(t + 1) * h];
        scratch.dgates[slot] = kernels::dot(dout_t, &acts.ye[row * h..(row + 1) * h]);
        let dye = &mut scratch.dye[row * h..(row + 1) * h];
        for (d, &g) in dye.iter_mut().zip(dout_t) {
            *d = acts.gates[slot] * g;
        }
    }
    for (e, expert) in ranges.experts.iter().enumerate() {
        let rows = acts.offsets[e]..acts.offsets[e + 1];
        let n = rows.len();
        if n == 0 {
            grads[expert.gate_up.clone()].fill(0.0);
            grads[expert.down.clone()].fill(0.0);
            continue;
        }
        let dact = &mut scratch.dact[rows.start * f..rows.end * f];
        let dye = &scratch.dye[rows.start * h..rows.end * h];
        let act = &acts.act[rows.start * f..rows.end * f];
        layers::linear_backward(
            dact,
            &mut grads[expert.down.clone()],
            dye,
            act,
            &params[expert.down.clone()],
            n,
            f,
            h,
            Write::Overwrite,
        );
        let dgate_up = &mut scratch.dgate_up[rows.start * 2 * f..rows.end * 2 * f];
        kernels::swiglu_backward(
            dgate_up,
            dact,
            &acts.gate_up[rows.start * 2 * f..rows.end * 2 * f],
            f,
        );
        layers::linear_backward(
            &mut scratch.dxe[rows.start * h..rows.end * h],
            &mut grads[expert.gate_up.clone()],
            dgate_up,
            &acts.xe[rows.start * h..rows.end * h],
            &params[expert.gate_up.clone()],
            n,
            h,
            2 * f,
            Write::Overwrite,
        );
        sum_sq += kernels::sum_of_squares(&grads[expert.gate_up.clone()]);
        sum_sq += kernels::sum_of_squares(&grads[expert.down.clone()]);
    }
    // dxn_t = Σ_j dxe[row(t, j)]   (the expert path)
    for t in 0..tokens {
        let dxn_t = &mut dxn[t * h..(t + 1) * h];
        dxn_t.fill(0.0);
        for j in 0..k {
            let row = acts.slot_row[t * k + j];
            kernels::add_assign(dxn_t, &scratch.dxe[row * h..(row + 1) * h]);
        }
    }
    // Router: gates and aux loss → dp → softmax backward.
    let slots = (tokens * k) as f32;
    let aux_scale = aux_alpha * n_experts as f32 / tokens as f32;
    for t in 0..tokens {
        let p = &acts.probs[t * n_experts..(t + 1) * n_experts];
        let chosen = &acts.experts[t * k..(t + 1) * k];
        let gates = &acts.gates[t * k..(t + 1) * k];
        let dgates = &scratch.dgates[t * k..(t + 1) * k];
        let dp = &mut scratch.dprobs;
        for (dp, &c) in dp.iter_mut().zip(&acts.counts) {
            *dp = aux_scale * (c as f32 / slots);
        }
        let kept: f32 = chosen.iter().map(|&e| p[e as usize]).sum();
        let w_dot_dw = kernels::dot(gates, dgates);
        for (&e, &dw) in chosen.iter().zip(dgates) {
            dp[e as usize] += (dw - w_dot_dw) / kept;
        }
        let p_dot_dp = kernels::dot(p, dp);
        let dr = &mut scratch.dlogits[t * n_experts..(t + 1) * n_experts];
        for ((dr, &p), &dp) in dr.iter_mut().zip(p).zip(dp.iter()) {
            *dr = p * (dp - p_dot_dp);
        }
    }
    layers::linear_backward(
        dxn,
        &mut grads[ranges.router.clone()],
        &scratch.dlogits[..tokens * n_experts],
        xn,
        &params[ranges.router.clone()],
        tokens,
        h,
        n_experts,
        Write::Accumulate,
    );
    sum_sq + kernels::sum_of_squares(&grads[ranges.router.clone()])
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
