package moe

import "math"

// The simple layers as forward/backward pairs over flat row-major slices,
// shapes in the first comment. T is the number of tokens (B·S), h the width.
// Backward functions overwrite parameter gradients and add into input gradients
// unless they say otherwise.

const rmsEps = 1e-6

// embeddingForward: x [T, h] ← table [V, h] rows ids [T].
func embeddingForward(x, table []float32, ids []int, h int) {
	for t, id := range ids {
		copy(x[t*h:(t+1)*h], table[id*h:(id+1)*h])
	}
}

// embeddingBackward: dtable [V, h] (overwritten) = scatter-add of dx [T, h] by ids.
func embeddingBackward(dtable, dx []float32, ids []int, h int) {
	clear(dtable)
	for t, id := range ids {
		axpy(dtable[id*h:(id+1)*h], 1, dx[t*h:(t+1)*h])
	}
}

// rmsnormForward: x [T, h], γ [h] → y [T, h], invRMS [T].
//
//	r_t = 1/sqrt(mean_j x_tj² + ε);  y_tj = γ_j·x_tj·r_t
func rmsnormForward(y, invRMS, x, gamma []float32) {
	h := len(gamma)
	for t := range invRMS {
		xt := x[t*h : (t+1)*h]
		r := float32(1 / math.Sqrt(float64(dot(xt, xt)/float32(h)+rmsEps)))
		invRMS[t] = r
		for j, g := range gamma {
			y[t*h+j] = g * (xt[j] * r)
		}
	}
}

// rmsnormBackward: dy, x [T, h], invRMS [T], γ [h] → dx [T, h] (added), dγ [h] (overwritten).
// With x̂ = x·r and g = γ⊙dy:  dγ_j = Σ_t dy_tj·x̂_tj;  dx_t += r_t·(g_t − x̂_t·(g_t·x̂_t)/h)
func rmsnormBackward(dx, dgamma, dy, x, invRMS, gamma []float32) {
	h := len(gamma)
	clear(dgamma)
	for t, r := range invRMS {
		xt, dyt, dxt := x[t*h:(t+1)*h], dy[t*h:(t+1)*h], dx[t*h:(t+1)*h]
		var gx float32
		for j := range gamma {
			xhat := xt[j] * r
			dgamma[j] += dyt[j] * xhat
			gx += gamma[j] * dyt[j] * xhat
		}
		c := gx / float32(h)
		for j := range gamma {
			dxt[j] += r * (gamma[j]*dyt[j] - xt[j]*r*c)
		}
	}
}

// linearForward: y [T, out] (=, or += when add) x [T, in]·Wᵀ, W [out, in].
func linearForward(y, x, w []float32, tokens, in, out int, add bool) {
	gemm(false, true, tokens, out, in, x, in, w, in, beta(add), y, out)
}

// linearBackward: dy [T, out], x [T, in], W [out, in] →
// dW = dyᵀ·x (overwritten);  dx = dy·W (overwritten, or added when add).
func linearBackward(dx, dw, dy, x, w []float32, tokens, in, out int, add bool) {
	gemm(true, false, out, in, tokens, dy, out, x, in, 0, dw, in)
	gemm(false, false, tokens, in, out, dy, out, w, in, beta(add), dx, in)
}

func beta(add bool) float32 {
	if add {
		return 1
	}
	return 0
}

// Rope holds cos θ and sin θ [maxSeq, d/2], computed in float64:
// b' = base if α ≤ 1 else base·α^(d/(d−2));  f_i = b'^(−2i/d);  θ = p·f_i.
type Rope struct {
	cos, sin []float32
	pairs    int
}

func newRope(c Config) Rope {
	d := float64(c.HeadDim)
	base := c.RopeBase
	if c.RopeAlpha > 1 {
		base *= math.Pow(c.RopeAlpha, d/(d-2))
	}
	r := Rope{pairs: c.HeadDim / 2}
	for p := 0; p < c.MaxSeqLen; p++ {
		for i := 0; i < r.pairs; i++ {
			theta := float64(p) * math.Pow(base, -2*float64(i)/d)
			r.cos = append(r.cos, float32(math.Cos(theta)))
			r.sin = append(r.sin, float32(math.Sin(theta)))
		}
	}
	return r
}

// rotate turns every head vector in heads [n·d] of the token at position by
// +θ (sign 1) or by −θ (sign −1: the inverse, Rᵀ, which is also RoPE's
// backward). Interleaved pairs: (a, b) → (a·cosθ − b·sinθ, a·sinθ + b·cosθ).
func (r Rope) rotate(heads []float32, position int, sign float32) {
	cos, sin := r.cos[position*r.pairs:], r.sin[position*r.pairs:]
	for at := 0; at < len(heads); at += 2 * r.pairs {
		for i := 0; i < r.pairs; i++ {
			a, b := heads[at+2*i], heads[at+2*i+1]
			c, s := cos[i], sign*sin[i]
			heads[at+2*i], heads[at+2*i+1] = a*c-b*s, a*s+b*c
		}
	}
}

// softmax: x ← softmax(c·x) in place, max-subtracted.
func softmax(x []float32, c float32) {
	m := float32(math.Inf(-1))
	for _, v := range x {
		m = max(m, v)
	}
	var sum float32
	for i, v := range x {
		x[i] = float32(math.Exp(float64((v - m) * c)))
		sum += x[i]
	}
	for i := range x {
		x[i] /= sum
	}
}

func sigmoid(z float32) float32 { return float32(1 / (1 + math.Exp(-float64(z)))) }

// swigluForward: g, u [n, F] → act [n, F] = silu(g)⊙u, silu(g) = g·σ(g).
func swigluForward(act, g, u []float32) {
	for i := range act {
		act[i] = g[i] * sigmoid(g[i]) * u[i]
	}
}

// swigluBackward: dact, g, u [n, F] → dg, du (overwritten).
//
//	du = dact⊙silu(g);  dg = dact⊙u⊙σ(g)·(1 + g·(1 − σ(g)))
func swigluBackward(dg, du, dact, g, u []float32) {
	for i := range dact {
		s := sigmoid(g[i])
		du[i] = dact[i] * g[i] * s
		dg[i] = dact[i] * u[i] * s * (1 + g[i]*(1-s))
	}
}

// crossEntropy: logits [T, V], targets [T] → dlogits [T, V] (overwritten); returns L_ce.
//
//	L = (1/T)·Σ_t (lse_t − z_{t,y_t});  dL/dz_tv = (softmax(z_t)_v − [v = y_t])/T
func crossEntropy(dlogits, logits []float32, targets []int, vocab int) float32 {
	var total float64
	scale := 1 / float32(len(targets))
	for t, y := range targets {
		z, dz := logits[t*vocab:(t+1)*vocab], dlogits[t*vocab:(t+1)*vocab]
		m := float32(math.Inf(-1))
		for _, v := range z {
			m = max(m, v)
		}
		var sum float32
		for i, v := range z {
			dz[i] = float32(math.Exp(float64(v - m)))
			sum += dz[i]
		}
		for i := range dz {
			dz[i] *= scale / sum
		}
		dz[y] -= scale
		total += float64(m + float32(math.Log(float64(sum))) - z[y])
	}
	return float32(total / float64(len(targets)))
}

// dot: Σ_i a_i·b_i, four partial sums.
func dot(a, b []float32) float32 {
	b = b[:len(a)]
	var s0, s1, s2, s3 float32
	i := 0
	for ; i+4 <= len(a); i += 4 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
	}
	for ; i < len(a); i++ {
		s0 += a[i] * b[i]
	}
	return (s0 + s2) + (s1 + s3)
}

// axpy: y += α·x.
func axpy(y []float32, alpha float32, x []float32) {
	x = x[:len(y)]
	for i := range y {
		y[i] += alpha * x[i]
	}
}

// sumSquares: Σ x² in float64.
func sumSquares(x []float32) float64 {
	var s float64
	for _, v := range x {
		s += float64(v) * float64(v)
	}
	return s
}
