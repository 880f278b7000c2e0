package moe

import (
	"math"
	"math/rand/v2"
	"sort"
)

// Kind names a sampling rule (CONTRACT §7).
type Kind int

const (
	Greedy Kind = iota
	Temperature
	TopK
	TopP
)

// Strategy is how the next token is chosen: Greedy ignores T, K and P;
// T ≤ 0 means greedy; TopK with K = 0 or K ≥ V keeps every token.
type Strategy struct {
	Kind Kind
	T    float32
	K    int
	P    float32
}

// Validate checks t ≥ 0 and finite, p in (0, 1], 0 ≤ k ≤ V.
func (s Strategy) Validate(vocab int) error {
	switch {
	case s.Kind == Greedy:
		return nil
	case s.Kind == TopK && (s.K < 0 || s.K > vocab):
		return invalid("top-k k = %d outside 0..%d", s.K, vocab)
	case s.Kind == TopP && !(s.P > 0 && s.P <= 1):
		return invalid("top-p p = %v outside (0, 1]", s.P)
	case !(s.T >= 0) || math.IsInf(float64(s.T), 0):
		return invalid("temperature t = %v must be finite and ≥ 0", s.T)
	}
	return nil
}

// PickToken chooses the next token of logits [V] under s, drawing from rng.
func PickToken(logits []float32, s Strategy, rng *rand.Rand) (int, error) {
	if len(logits) == 0 {
		return 0, invalid("empty logits")
	}
	if err := s.Validate(len(logits)); err != nil {
		return 0, err
	}
	if s.Kind == Greedy || s.T <= 0 {
		best := 0 // ties to the lowest id
		for i, v := range logits {
			if v > logits[best] {
				best = i
			}
		}
		return best, nil
	}
	order := make([]int, len(logits)) // descending logit, ties to the lower id
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return logits[order[a]] > logits[order[b]] })
	if s.Kind == TopK && s.K > 0 {
		order = order[:s.K]
	}
	// p_i = exp((z_i − z_max)/t) / Σ_j exp((z_j − z_max)/t), in float64
	probs, sum := make([]float64, len(order)), 0.0
	for i, id := range order {
		probs[i] = math.Exp(float64((logits[id] - logits[order[0]]) / s.T))
		sum += probs[i]
	}
	keep, cumulative := len(probs), 0.0
	for i := range probs {
		probs[i] /= sum
		cumulative += probs[i]
		if s.Kind == TopP && cumulative >= float64(s.P) && keep == len(probs) {
			keep = i + 1 // the crossing token is kept
		}
	}
	probs, sum = probs[:keep], 0
	for _, q := range probs {
		sum += q
	}
	u, cumulative := rng.Float64()*sum, 0.0
	for i, q := range probs {
		if cumulative += q; u < cumulative {
			return order[i], nil
		}
	}
	return order[keep-1], nil
}

// Generate returns prompt followed by new tokens up to maxLen tokens in all.
// Same seed → same tokens. The model sees the last max_seq_len tokens
// (CONTRACT §7): a longer prompt is cut from the left and maxLen may exceed
// max_seq_len. Until the KV cache is full each new token costs one position;
// after it, each new token re-prefills the last max_seq_len tokens into the
// emptied cache (one window-long forward per token).
func Generate(m *Model, prompt []int, maxLen int, s Strategy, seed uint64) ([]int, error) {
	if len(prompt) == 0 {
		return nil, invalid("empty prompt")
	}
	if err := s.Validate(m.Cfg.VocabSize); err != nil {
		return nil, err
	}
	if maxLen < len(prompt) {
		return nil, invalid("total length %d is shorter than the prompt (%d)", maxLen, len(prompt))
	}
	window := m.Cfg.MaxSeqLen
	last := func(tokens []int) []int { return tokens[max(0, len(tokens)-window):] }
	tokens := append([]int(nil), prompt...)
	kv, rng := NewKVCache(m.Cfg, maxLen), rand.New(rand.NewPCG(seed, 0x5eed))
	logits, err := m.ForwardCached(last(prompt), kv)
	for err == nil && len(tokens) < maxLen {
		var next int
		if next, err = PickToken(logits, s, rng); err != nil {
			break
		}
		tokens = append(tokens, next)
		switch {
		case len(tokens) == maxLen:
		case kv.Len < kv.Cap:
			logits, err = m.ForwardCached([]int{next}, kv)
		default: // the cache is full: slide the window
			kv.Len = 0
			logits, err = m.ForwardCached(last(tokens), kv)
		}
	}
	return tokens, err
}
