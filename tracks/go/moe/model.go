package moe

import "math"

// Model is a Mixture-of-Experts Transformer: its config, flat parameters
// (Layout order) and named views of them.
type Model struct {
	Cfg    Config
	Params []float32
	W      Weights
	rope   Rope
}

// NewModel wraps parameters (flat, Layout order) for cfg.
func NewModel(cfg Config, params []float32) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if _, total := Layout(cfg); len(params) != total {
		return nil, invalid("%d parameters, the config needs %d", len(params), total)
	}
	return &Model{cfg, params, bind(cfg, params), newRope(cfg)}, nil
}

// Batch is token ids and next-token targets, both [B, S] flattened.
type Batch struct {
	IDs, Targets []int
	B, S         int
}

// NewBatch builds a batch from equal-length rows.
func NewBatch(ids, targets [][]int) (Batch, error) {
	if len(ids) == 0 || len(ids[0]) == 0 {
		return Batch{}, invalid("empty batch")
	}
	if len(ids) != len(targets) {
		return Batch{}, invalid("%d rows of ids, %d of targets", len(ids), len(targets))
	}
	b := Batch{B: len(ids), S: len(ids[0])}
	for r := range ids {
		if len(ids[r]) != b.S || len(targets[r]) != b.S {
			return Batch{}, invalid("row %d: %d ids and %d targets, expected %d", r, len(ids[r]), len(targets[r]), b.S)
		}
		b.IDs, b.Targets = append(b.IDs, ids[r]...), append(b.Targets, targets[r]...)
	}
	return b, nil
}

// LoadBatch reads {"ids": [[...]], "targets": [[...]]} (rows of equal length).
func LoadBatch(path string) (Batch, error) {
	var rows struct {
		IDs     [][]int `json:"ids"`
		Targets [][]int `json:"targets"`
	}
	if err := decodeStrict(path, &rows); err != nil {
		return Batch{}, err
	}
	return NewBatch(rows.IDs, rows.Targets)
}

// Losses are the two parts of the training loss.
type Losses struct{ CE, Aux float32 }

// Total is L_ce + Σ_layers L_aux.
func (l Losses) Total() float32 { return l.CE + l.Aux }

// blockCache is what one block's forward keeps for backward.
type blockCache struct {
	xIn, attnRMS, xnAttn, q, k, v, probs, attnOut, xMid, moeRMS, xnMoe []float32
	moe                                                                *moeCache
}

// Pass holds every activation of one forward.
type Pass struct {
	ids         []int
	b, s        int
	blocks      []*blockCache
	x, finalRMS []float32 // final residual stream [T, h], its 1/rms [T]
	xnFinal     []float32 // RMSNorm_final(x) [T, h]
	Logits      []float32 // [B, S, V]
}

// Routes are the experts chosen in layer l, [T, k], descending probability.
func (p *Pass) Routes(l int) []int { return p.blocks[l].moe.experts }

// checkIDs validates ids [B·S] against the vocabulary and max_seq_len; returns S.
func (m *Model) checkIDs(ids []int, batch, past int) (int, error) {
	if len(ids) == 0 || batch <= 0 || len(ids)%batch != 0 {
		return 0, invalid("%d token ids do not form %d non-empty rows", len(ids), batch)
	}
	seq := len(ids) / batch
	if past+seq > m.Cfg.MaxSeqLen {
		return 0, invalid("sequence of %d tokens exceeds max_seq_len %d", past+seq, m.Cfg.MaxSeqLen)
	}
	for i, id := range ids {
		if id < 0 || id >= m.Cfg.VocabSize {
			return 0, invalid("token id %d at %d is outside the vocabulary of %d", id, i, m.Cfg.VocabSize)
		}
	}
	return seq, nil
}

// Forward returns the logits [B, S, V] of ids [B·S], keeping the activations.
func (m *Model) Forward(ids []int, batch int) (*Pass, error) {
	seq, err := m.checkIDs(ids, batch, 0)
	if err != nil {
		return nil, err
	}
	return m.forward(ids, batch, seq, nil), nil
}

// ForwardCached returns the logits [V] of the last of ids (one sequence),
// reading and extending kv: earlier positions are not recomputed.
func (m *Model) ForwardCached(ids []int, kv *KVCache) ([]float32, error) {
	seq, err := m.checkIDs(ids, 1, kv.Len)
	if err != nil {
		return nil, err
	}
	if kv.Len+seq > kv.Cap || len(kv.K) != m.Cfg.NLayers {
		return nil, invalid("KV cache of %d positions cannot take %d more", kv.Cap, kv.Len+seq)
	}
	logits := m.forward(ids, 1, seq, kv).Logits
	kv.Len += seq
	return logits[(seq-1)*m.Cfg.VocabSize:], nil
}

// forward: embedding → blocks → final RMSNorm → LM head (CONTRACT §3).
func (m *Model) forward(ids []int, batch, seq int, kv *KVCache) *Pass {
	c, T := m.Cfg, len(ids)
	h := c.HiddenDim
	p := &Pass{ids: ids, b: batch, s: seq, x: make([]float32, T*h), finalRMS: make([]float32, T),
		xnFinal: make([]float32, T*h), Logits: make([]float32, T*c.VocabSize)}
	embeddingForward(p.x, m.W.Embed, ids, h)
	for l := range m.W.Layers {
		p.blocks = append(p.blocks, m.blockForward(l, p.x, batch, seq, kv))
	}
	rmsnormForward(p.xnFinal, p.finalRMS, p.x, m.W.FinalNorm)
	linearForward(p.Logits, p.xnFinal, m.W.LMHead, T, h, c.VocabSize, false)
	return p
}

// blockForward updates the residual stream x [T, h] in place:
//
//	x_mid = x + Attn(RMSNorm_attn(x));  x_out = x_mid + MoE(RMSNorm_moe(x_mid))
func (m *Model) blockForward(l int, x []float32, batch, seq int, kv *KVCache) *blockCache {
	c, w, T := m.Cfg, m.W.Layers[l], len(x)/m.Cfg.HiddenDim
	h, hd, kvd := c.HiddenDim, c.NHeads*c.HeadDim, c.NKVHeads*c.HeadDim
	bc := &blockCache{xIn: clone(x), attnRMS: make([]float32, T), xnAttn: make([]float32, T*h),
		q: make([]float32, T*hd), k: make([]float32, T*kvd), v: make([]float32, T*kvd), attnOut: make([]float32, T*hd)}
	rmsnormForward(bc.xnAttn, bc.attnRMS, x, w.AttnNorm)
	linearForward(bc.q, bc.xnAttn, w.Wq, T, h, hd, false)
	linearForward(bc.k, bc.xnAttn, w.Wk, T, h, kvd, false)
	linearForward(bc.v, bc.xnAttn, w.Wv, T, h, kvd, false)
	offset := 0
	if kv != nil {
		offset = kv.Len
	}
	for t := 0; t < T; t++ { // RoPE on q and k, not v
		m.rope.rotate(bc.q[t*hd:(t+1)*hd], offset+t%seq, 1)
		m.rope.rotate(bc.k[t*kvd:(t+1)*kvd], offset+t%seq, 1)
	}
	dims, keys := attnDims{c.NHeads, c.NHeads / c.NKVHeads, c.HeadDim}, offset+seq
	bc.probs = make([]float32, batch*c.NHeads*seq*keys)
	for b := 0; b < batch; b++ {
		rows, kRows := b*seq*hd, b*seq*kvd
		k, v := bc.k[kRows:kRows+seq*kvd], bc.v[kRows:kRows+seq*kvd]
		if kv != nil {
			copy(kv.K[l][offset*kvd:], k)
			copy(kv.V[l][offset*kvd:], v)
			k, v = kv.K[l][:keys*kvd], kv.V[l][:keys*kvd]
		}
		probs := bc.probs[b*c.NHeads*seq*keys : (b+1)*c.NHeads*seq*keys]
		attentionForward(bc.attnOut[rows:rows+seq*hd], probs, bc.q[rows:rows+seq*hd], k, v, seq, offset, dims)
	}
	linearForward(x, bc.attnOut, w.Wo, T, hd, h, true)
	bc.xMid, bc.moeRMS, bc.xnMoe = clone(x), make([]float32, T), make([]float32, T*h)
	rmsnormForward(bc.xnMoe, bc.moeRMS, x, w.MoENorm)
	bc.moe = moeForward(x, bc.xnMoe, w, c)
	return bc
}

func clone(x []float32) []float32 { return append([]float32(nil), x...) }

// LossAndGrads runs a training forward of b, the losses of CONTRACT §4, and
// the exact gradient of the total loss for every parameter into grads (flat,
// Layout order). It returns the pass, the losses and Σ g² over all gradients.
func (m *Model) LossAndGrads(b Batch, alpha float32, grads []float32) (*Pass, Losses, float64, error) {
	if len(grads) != len(m.Params) {
		return nil, Losses{}, 0, invalid("gradient buffer of %d, need %d", len(grads), len(m.Params))
	}
	if len(b.Targets) != len(b.IDs) {
		return nil, Losses{}, 0, invalid("%d targets for %d ids", len(b.Targets), len(b.IDs))
	}
	if _, err := m.checkIDs(b.Targets, b.B, 0); err != nil {
		return nil, Losses{}, 0, err
	}
	p, err := m.Forward(b.IDs, b.B)
	if err != nil {
		return nil, Losses{}, 0, err
	}
	c, T := m.Cfg, len(b.IDs)
	dlogits := make([]float32, T*c.VocabSize)
	losses := Losses{CE: crossEntropy(dlogits, p.Logits, b.Targets, c.VocabSize)}
	for _, bc := range p.blocks {
		losses.Aux += alpha * float32(c.NExperts) * bc.moe.balance()
	}
	if t := float64(losses.Total()); math.IsNaN(t) || math.IsInf(t, 0) {
		return nil, losses, 0, invalid("non-finite loss %v", t)
	}
	m.backward(p, dlogits, alpha, bind(c, grads))
	return p, losses, sumSquares(grads), nil
}

// backward runs from dlogits [T, V] through the whole model into g (§5).
func (m *Model) backward(p *Pass, dlogits []float32, alpha float32, g Weights) {
	c, T := m.Cfg, len(p.ids)
	h := c.HiddenDim
	dx, dxn := make([]float32, T*h), make([]float32, T*h)
	linearBackward(dxn, g.LMHead, dlogits, p.xnFinal, m.W.LMHead, T, h, c.VocabSize, false)
	rmsnormBackward(dx, g.FinalNorm, dxn, p.x, p.finalRMS, m.W.FinalNorm)
	for l := len(p.blocks) - 1; l >= 0; l-- {
		m.blockBackward(l, p, dx, dxn, alpha, g.Layers[l])
	}
	embeddingBackward(g.Embed, dx, p.ids, h)
}

// blockBackward: dx [T, h] holds dL/d(block output) on entry and dL/d(block
// input) on exit; the block's parameter gradients go into g. Each sublayer's
// backward runs before its norm's backward.
func (m *Model) blockBackward(l int, p *Pass, dx, dxn []float32, alpha float32, g Layer) {
	c, w, bc, T := m.Cfg, m.W.Layers[l], p.blocks[l], len(p.ids)
	h, hd, kvd, seq := c.HiddenDim, c.NHeads*c.HeadDim, c.NKVHeads*c.HeadDim, p.s
	moeBackward(dxn, dx, bc.xnMoe, bc.moe, w, g, c, alpha)
	rmsnormBackward(dx, g.MoENorm, dxn, bc.xMid, bc.moeRMS, w.MoENorm)
	dattn, dq, dk, dv := make([]float32, T*hd), make([]float32, T*hd), make([]float32, T*kvd), make([]float32, T*kvd)
	linearBackward(dattn, g.Wo, dx, bc.attnOut, w.Wo, T, hd, h, false)
	dims := attnDims{c.NHeads, c.NHeads / c.NKVHeads, c.HeadDim}
	for b := 0; b < p.b; b++ {
		q, kv := b*seq*hd, b*seq*kvd
		attentionBackward(dq[q:q+seq*hd], dk[kv:kv+seq*kvd], dv[kv:kv+seq*kvd], dattn[q:q+seq*hd],
			bc.probs[b*c.NHeads*seq*seq:(b+1)*c.NHeads*seq*seq], bc.q[q:q+seq*hd], bc.k[kv:kv+seq*kvd], bc.v[kv:kv+seq*kvd], seq, dims)
	}
	for t := 0; t < T; t++ { // RoPE backward: the inverse rotation
		m.rope.rotate(dq[t*hd:(t+1)*hd], t%seq, -1)
		m.rope.rotate(dk[t*kvd:(t+1)*kvd], t%seq, -1)
	}
	linearBackward(dxn, g.Wq, dq, bc.xnAttn, w.Wq, T, h, hd, false)
	linearBackward(dxn, g.Wk, dk, bc.xnAttn, w.Wk, T, h, kvd, true)
	linearBackward(dxn, g.Wv, dv, bc.xnAttn, w.Wv, T, h, kvd, true)
	rmsnormBackward(dx, g.AttnNorm, dxn, bc.xIn, bc.attnRMS, w.AttnNorm)
}
