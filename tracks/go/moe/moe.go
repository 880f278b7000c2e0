package moe

// moeCache is what the MoE forward of T tokens keeps for backward.
type moeCache struct {
	probs   []float32   // router probabilities p = softmax(x·W_rᵀ) [T, E]
	experts []int       // chosen experts [T, k], descending p
	gates   []float32   // renormalised gates w [T, k]
	counts  []int       // top-k slots given to each expert [E]
	meanP   []float32   // P_e = mean_t p_te [E]
	slots   [][]int     // per expert: the slots t·k+j routed to it, in token order
	xe      [][]float32 // per expert: its tokens' inputs [n, h]
	g, u    [][]float32 // per expert: gate and up pre-activations [n, F]
	act     [][]float32 // per expert: silu(g)⊙u [n, F]
	ye      [][]float32 // per expert: outputs E_e(x) [n, h]
}

// balance is Σ_e f_e·P_e with f_e = counts_e/(T·k); the layer's aux loss is α·E times it.
func (c *moeCache) balance() float32 {
	slots := float32(len(c.experts))
	var s float32
	for e, n := range c.counts {
		s += float32(n) / slots * c.meanP[e]
	}
	return s
}

// moeForward: xn [T, h] → out [T, h] (added: the residual).
//
//	p_t = softmax(xn_t·W_rᵀ);  top-k e_{t,j} by p (ties to the lower index);
//	w_{t,j} = p_{t,e_j}/Σ_j' p_{t,e_j'};  E_e(x) = W_down·(silu(W_gate·x)⊙(W_up·x))
//	out_t += Σ_j w_{t,j}·E_{e_j}(xn_t)
func moeForward(out, xn []float32, w Layer, c Config) *moeCache {
	h, f, E, k, T := c.HiddenDim, c.FFNDim, c.NExperts, c.TopK, len(xn)/c.HiddenDim
	mc := &moeCache{probs: make([]float32, T*E), counts: make([]int, E), meanP: make([]float32, E),
		experts: make([]int, T*k), gates: make([]float32, T*k), slots: make([][]int, E)}
	linearForward(mc.probs, xn, w.Router, T, h, E, false)
	for t := 0; t < T; t++ {
		p := mc.probs[t*E : (t+1)*E]
		softmax(p, 1)
		mc.route(t, p, k)
	}
	for e := range mc.meanP {
		mc.meanP[e] /= float32(T)
	}
	for e, ex := range w.Experts {
		n := len(mc.slots[e])
		xe, g, u, act, ye := make([]float32, n*h), make([]float32, n*f), make([]float32, n*f), make([]float32, n*f), make([]float32, n*h)
		for r, slot := range mc.slots[e] {
			copy(xe[r*h:(r+1)*h], xn[slot/k*h:])
		}
		linearForward(g, xe, ex.Gate, n, h, f, false)
		linearForward(u, xe, ex.Up, n, h, f, false)
		swigluForward(act, g, u)
		linearForward(ye, act, ex.Down, n, f, h, false)
		for r, slot := range mc.slots[e] {
			axpy(out[slot/k*h:(slot/k+1)*h], mc.gates[slot], ye[r*h:(r+1)*h])
		}
		mc.xe, mc.g, mc.u, mc.act, mc.ye = append(mc.xe, xe), append(mc.g, g), append(mc.u, u), append(mc.act, act), append(mc.ye, ye)
	}
	return mc
}

// route picks token t's top-k experts from p, sets its gates and records the
// slots per expert; it also adds p into meanP (divided by T by the caller).
func (mc *moeCache) route(t int, p []float32, k int) {
	chosen := mc.experts[t*k : (t+1)*k]
	var kept float32
	for j := range chosen {
		best := -1
		for e := range p {
			taken := false
			for _, c := range chosen[:j] {
				taken = taken || c == e
			}
			if !taken && (best < 0 || p[e] > p[best]) {
				best = e
			}
		}
		chosen[j] = best
		kept += p[best]
		mc.counts[best]++
		mc.slots[best] = append(mc.slots[best], t*k+j)
	}
	for j, e := range chosen {
		mc.gates[t*k+j] = p[e] / kept
	}
	for e, pe := range p {
		mc.meanP[e] += pe
	}
}

// moeBackward: dout [T, h] (gradient of the sublayer output), xn [T, h] →
// dxn [T, h] (overwritten) and the router's and experts' gradients in gw
// (overwritten; an expert with no token gets exactly zero).
//
//	dw_{t,j} = dout_t·E_{e_j}(xn_t);  dE_{e_j} = w_{t,j}·dout_t
//	gates:    dp_i += (dw_i − Σ_j w_j·dw_j)/Σ_j p_{e_j}   for i in the top-k
//	aux loss: dp_{t,e} += α·E·f_e/T   (f constant)
//	softmax:  dr_{t,e} = p_e·(dp_e − Σ_e' p_e'·dp_e')
func moeBackward(dxn, dout, xn []float32, mc *moeCache, w, gw Layer, c Config, alpha float32) {
	h, f, E, k, T := c.HiddenDim, c.FFNDim, c.NExperts, c.TopK, len(xn)/c.HiddenDim
	dgates := make([]float32, T*k)
	clear(dxn)
	for e, ex := range w.Experts {
		n, ge := len(mc.slots[e]), gw.Experts[e]
		if n == 0 {
			clear(ge.Gate)
			clear(ge.Up)
			clear(ge.Down)
			continue
		}
		dye, dact, dg, du, dxe := make([]float32, n*h), make([]float32, n*f), make([]float32, n*f), make([]float32, n*f), make([]float32, n*h)
		for r, slot := range mc.slots[e] {
			dout_t := dout[slot/k*h : (slot/k+1)*h]
			dgates[slot] = dot(dout_t, mc.ye[e][r*h:(r+1)*h])
			axpy(dye[r*h:(r+1)*h], mc.gates[slot], dout_t)
		}
		linearBackward(dact, ge.Down, dye, mc.act[e], ex.Down, n, f, h, false)
		swigluBackward(dg, du, dact, mc.g[e], mc.u[e])
		linearBackward(dxe, ge.Gate, dg, mc.xe[e], ex.Gate, n, h, f, false)
		linearBackward(dxe, ge.Up, du, mc.xe[e], ex.Up, n, h, f, true)
		for r, slot := range mc.slots[e] {
			axpy(dxn[slot/k*h:(slot/k+1)*h], 1, dxe[r*h:(r+1)*h])
		}
	}
	dr, dp := make([]float32, T*E), make([]float32, E)
	auxScale := alpha * float32(E) / float32(T)
	for t := 0; t < T; t++ {
		p, chosen := mc.probs[t*E:(t+1)*E], mc.experts[t*k:(t+1)*k]
		for e, n := range mc.counts {
			dp[e] = auxScale * (float32(n) / float32(T*k))
		}
		var kept float32
		for _, e := range chosen {
			kept += p[e]
		}
		wdw := dot(mc.gates[t*k:(t+1)*k], dgates[t*k:(t+1)*k])
		for j, e := range chosen {
			dp[e] += (dgates[t*k+j] - wdw) / kept
		}
		pdp := dot(p, dp)
		for e := range dp {
			dr[t*E+e] = p[e] * (dp[e] - pdp)
		}
	}
	linearBackward(dxn, gw.Router, dr, xn, w.Router, T, h, E, true)
}
