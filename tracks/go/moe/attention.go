package moe

import "math"

// attnDims are the sizes attention needs: H query heads, H/Hkv query heads
// per key/value head, head size d.
type attnDims struct{ heads, group, d int }

// attentionForward for S queries at positions offset..offset+S−1 over
// L = offset+S keys (offset > 0 only with a KV cache).
// q [S, H·d], k, v [L, Hkv·d] → out [S, H·d], probs [H, S, L] (zero where masked).
// For head i reading KV head g = ⌊i/group⌋:
//
//	P_i = softmax(Q_i·K_gᵀ/sqrt(d)) over keys t ≤ offset+s (causal);  out_i = P_i·V_g
func attentionForward(out, probs, q, k, v []float32, seq, offset int, a attnDims) {
	d, keys := a.d, offset+seq
	hd, kvd := a.heads*d, len(k)/keys
	scale := float32(1 / math.Sqrt(float64(d)))
	for i := 0; i < a.heads; i++ {
		g, p := i/a.group, probs[i*seq*keys:(i+1)*seq*keys]
		gemm(false, true, seq, keys, d, q[i*d:], hd, k[g*d:], kvd, 0, p, keys)
		for s := 0; s < seq; s++ {
			row, visible := p[s*keys:(s+1)*keys], offset+s+1
			softmax(row[:visible], scale)
			clear(row[visible:])
		}
		gemm(false, false, seq, d, keys, p, keys, v[g*d:], kvd, 0, out[i*d:], hd)
	}
}

// attentionBackward for a fresh sequence (offset 0, L = S).
// dout [S, H·d], probs [H, S, S], q, k, v as in forward → dq [S, H·d], dk, dv
// [S, Hkv·d] (overwritten). For head i reading KV head g:
//
//	dP_i = dout_i·V_gᵀ;  dS_i = P_i⊙(dP_i − rowsum(P_i⊙dP_i))/sqrt(d)
//	dq_i = dS_i·K_g;  dk_g += dS_iᵀ·Q_i;  dv_g += P_iᵀ·dout_i
func attentionBackward(dq, dk, dv, dout, probs, q, k, v []float32, seq int, a attnDims) {
	d := a.d
	hd, kvd := a.heads*d, len(k)/seq
	scale := float32(1 / math.Sqrt(float64(d)))
	dp := make([]float32, seq*seq)
	for i := 0; i < a.heads; i++ {
		g, p := i/a.group, probs[i*seq*seq:(i+1)*seq*seq]
		gemm(false, true, seq, seq, d, dout[i*d:], hd, v[g*d:], kvd, 0, dp, seq)
		for s := 0; s < seq; s++ {
			pRow, dRow := p[s*seq:(s+1)*seq], dp[s*seq:(s+1)*seq]
			c := dot(pRow, dRow)
			for t := range dRow {
				dRow[t] = pRow[t] * (dRow[t] - c) * scale
			}
		}
		kvBeta := beta(i%a.group != 0) // the first head of a group overwrites dk_g, dv_g
		gemm(false, false, seq, d, seq, dp, seq, k[g*d:], kvd, 0, dq[i*d:], hd)
		gemm(true, false, seq, d, seq, dp, seq, q[i*d:], hd, kvBeta, dk[g*d:], kvd)
		gemm(true, false, seq, d, seq, p, seq, dout[i*d:], hd, kvBeta, dv[g*d:], kvd)
	}
}

// KVCache keeps every layer's rotated keys and values [capacity, Hkv·d] of one
// sequence, so each generated token costs one position.
type KVCache struct {
	K, V     [][]float32
	Len, Cap int
}

// NewKVCache makes an empty cache for up to capacity positions (≤ max_seq_len).
func NewKVCache(c Config, capacity int) *KVCache {
	capacity = min(capacity, c.MaxSeqLen)
	kv := &KVCache{Cap: capacity}
	for l := 0; l < c.NLayers; l++ {
		kv.K = append(kv.K, make([]float32, capacity*c.NKVHeads*c.HeadDim))
		kv.V = append(kv.V, make([]float32, capacity*c.NKVHeads*c.HeadDim))
	}
	return kv
}
