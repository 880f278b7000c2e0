"""The mixture of SwiGLU experts (CONTRACT §3) with its load-balancing term (§4)
and the backward through experts, gates, router and the aux loss (§5)."""

import numpy as np

from .layers import (linear_backward, linear_forward, softmax_backward, softmax_forward,
                     swiglu_backward, swiglu_forward)


def route(probs, k):
    """probs [T, E] → chosen [T, k] (int): top-k by p, descending, ties to the lower index."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


def moe_forward(x, w, config):
    """x [T, h] → out [T, h], balance = Σ_e f_e·P_e, chosen [T, k], saved.

    p_t = softmax(x_t·W_rᵀ);  top-k e_{t,j};  gates w_{t,j} = p_{t,e_j} / Σ_j' p_{t,e_j'};
    E_e(x) = W_down·(silu(W_gate·x) ⊙ (W_up·x));  out_t = Σ_j w_{t,j}·E_{e_j}(x_t).
    f_e = (slots given to e)/(T·k) (a constant), P_e = mean_t p_{t,e}.
    Experts run only on the tokens routed to them.
    """
    T = x.shape[0]
    E, k = config.n_experts, config.top_k
    probs = softmax_forward(linear_forward(x, w["router"]))
    chosen = route(probs, k)
    top = np.take_along_axis(probs, chosen, axis=-1)
    gates = top / top.sum(axis=-1, keepdims=True)
    out = np.zeros_like(x)
    experts = []
    for e in range(E):
        rows, slot = np.nonzero(chosen == e)
        if rows.size == 0:
            experts.append(None)
            continue
        xe = x[rows]
        a = linear_forward(xe, w["experts"][e]["gate_proj"])
        b = linear_forward(xe, w["experts"][e]["up_proj"])
        act, s = swiglu_forward(a, b)
        ye = linear_forward(act, w["experts"][e]["down_proj"])
        out[rows] += gates[rows, slot][:, None] * ye
        experts.append((rows, slot, xe, a, b, s, act, ye))
    f = (np.bincount(chosen.ravel(), minlength=E) / (T * k)).astype(x.dtype)
    balance = np.sum(f * probs.mean(axis=0))
    return out, balance, chosen, (x, probs, chosen, top, gates, f, experts)


def moe_backward(dout, saved, w, config, aux_scale):
    """dout [T, h] → dx [T, h], grads {"router": dW_r, "experts": [{name: dW} or None]}.

    aux_scale = α·E, the weight of this layer's Σ_e f_e·P_e in the loss.
    dw_{t,j} = dout_t·E_{e_j}(x_t);  dE_{e_j} = w_{t,j}·dout_t (then SwiGLU and linear backward);
    gates: dtop_j = (dw_j − Σ_i w_i·dw_i) / Σ_i p_{e_i}, scattered into dp at the chosen experts;
    aux: dp_{t,e} += α·E·f_e / T;  router: dr = softmax backward;  dW_r = drᵀ·x;  dx += dr·W_r.
    An expert without tokens keeps an exactly zero gradient.
    """
    x, probs, chosen, top, gates, f, experts = saved
    T = x.shape[0]
    dx = np.zeros_like(x)
    dgates = np.zeros_like(gates)
    expert_grads = []
    for e, kept in enumerate(experts):
        ew = w["experts"][e]
        if kept is None:
            expert_grads.append({n: np.zeros_like(ew[n]) for n in ("gate_proj", "up_proj", "down_proj")})
            continue
        rows, slot, xe, a, b, s, act, ye = kept
        dgates[rows, slot] = np.sum(dout[rows] * ye, axis=-1)
        dye = gates[rows, slot][:, None] * dout[rows]
        g = {}
        dact, g["down_proj"] = linear_backward(dye, act, ew["down_proj"])
        da, db = swiglu_backward(dact, a, b, s)
        dxa, g["gate_proj"] = linear_backward(da, xe, ew["gate_proj"])
        dxb, g["up_proj"] = linear_backward(db, xe, ew["up_proj"])
        dx[rows] += dxa + dxb  # a token picks an expert at most once: rows are distinct
        expert_grads.append(g)
    dtop = (dgates - np.sum(gates * dgates, axis=-1, keepdims=True)) / top.sum(axis=-1, keepdims=True)
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, chosen, dtop, axis=-1)
    dprobs += np.float32(aux_scale / T) * f
    dr = softmax_backward(dprobs, probs)
    dxr, drouter = linear_backward(dr, x, w["router"])
    return dx + dxr, {"router": drouter, "experts": expert_grads}
