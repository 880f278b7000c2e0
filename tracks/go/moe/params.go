package moe

import (
	"fmt"
	"math"
	"math/rand/v2"
)

// Tensor is one named parameter: its checkpoint name (CONTRACT §2), shape and
// place in the flat buffer.
type Tensor struct {
	Name   string
	Shape  []int
	Offset int
	Len    int
}

// Layout lists every tensor of a config in the order of CONTRACT §2; params,
// gradients and AdamW moments are flat buffers in this order.
func Layout(c Config) (tensors []Tensor, total int) {
	add := func(name string, shape ...int) {
		n := 1
		for _, s := range shape {
			n *= s
		}
		tensors = append(tensors, Tensor{name, shape, total, n})
		total += n
	}
	h, hd, kvd, f := c.HiddenDim, c.NHeads*c.HeadDim, c.NKVHeads*c.HeadDim, c.FFNDim
	add("embed.weight", c.VocabSize, h)
	for l := 0; l < c.NLayers; l++ {
		p := fmt.Sprintf("layers.%d.", l)
		add(p+"attn_norm.weight", h)
		add(p+"attn.q_proj.weight", hd, h)
		add(p+"attn.k_proj.weight", kvd, h)
		add(p+"attn.v_proj.weight", kvd, h)
		add(p+"attn.o_proj.weight", h, hd)
		add(p+"moe_norm.weight", h)
		add(p+"moe.router.weight", c.NExperts, h)
		for e := 0; e < c.NExperts; e++ {
			x := fmt.Sprintf("%smoe.experts.%d.", p, e)
			add(x+"gate_proj.weight", f, h)
			add(x+"up_proj.weight", f, h)
			add(x+"down_proj.weight", h, f)
		}
	}
	add("final_norm.weight", h)
	add("lm_head.weight", c.VocabSize, h)
	return tensors, total
}

// Expert holds one SwiGLU expert's matrices.
type Expert struct{ Gate, Up, Down []float32 }

// Layer holds one transformer block's tensors.
type Layer struct {
	AttnNorm, Wq, Wk, Wv, Wo, MoENorm, Router []float32
	Experts                                   []Expert
}

// Weights names the tensors of a flat buffer: the parameters, or the
// gradients (same layout, same struct).
type Weights struct {
	Embed     []float32
	Layers    []Layer
	FinalNorm []float32
	LMHead    []float32
}

// bind views flat (in Layout order) as Weights, without copying.
func bind(c Config, flat []float32) Weights {
	at := 0
	next := func(n int) []float32 {
		s := flat[at : at+n : at+n]
		at += n
		return s
	}
	h, hd, kvd, f := c.HiddenDim, c.NHeads*c.HeadDim, c.NKVHeads*c.HeadDim, c.FFNDim
	w := Weights{Embed: next(c.VocabSize * h)}
	for l := 0; l < c.NLayers; l++ {
		layer := Layer{AttnNorm: next(h), Wq: next(hd * h), Wk: next(kvd * h), Wv: next(kvd * h),
			Wo: next(h * hd), MoENorm: next(h), Router: next(c.NExperts * h)}
		for e := 0; e < c.NExperts; e++ {
			layer.Experts = append(layer.Experts, Expert{next(f * h), next(f * h), next(h * f)})
		}
		w.Layers = append(w.Layers, layer)
	}
	w.FinalNorm, w.LMHead = next(h), next(c.VocabSize*h)
	return w
}

// InitParams draws fresh parameters (CONTRACT §2): gains 1, every matrix
// N(0, 2/fan_in), each tensor from its own PCG stream seeded by (seed,
// FNV-1a(name)). Deterministic, but not the same numbers as the Rust init
// (which uses ChaCha8): checkpoints move between languages as files.
func InitParams(c Config, seed uint64) []float32 {
	tensors, total := Layout(c)
	flat := make([]float32, total)
	for _, t := range tensors {
		values := flat[t.Offset : t.Offset+t.Len]
		if len(t.Shape) == 1 {
			for i := range values {
				values[i] = 1
			}
			continue
		}
		rng := rand.New(rand.NewPCG(seed, fnv1a(t.Name)))
		std := math.Sqrt(2 / float64(t.Shape[1]))
		for i := range values {
			values[i] = float32(rng.NormFloat64() * std)
		}
	}
	return flat
}

// fnv1a is the 64-bit FNV-1a hash.
func fnv1a(s string) uint64 {
	h := uint64(0xcbf29ce484222325)
	for i := 0; i < len(s); i++ {
		h = (h ^ uint64(s[i])) * 0x100000001b3
	}
	return h
}
