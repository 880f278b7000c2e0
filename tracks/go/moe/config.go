// Package moe is the rosetta-moe Mixture-of-Experts Transformer (docs/CONTRACT.md
// §2–§7) written by hand in Go: forward, exact backward, AdamW and sampling.
package moe

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
)

// ErrInvalid marks bad user input: configs, batches, sampling settings, files.
var ErrInvalid = errors.New("invalid input")

// invalid wraps ErrInvalid with a message.
func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Config is the shape of a model (CONTRACT §1); its JSON keys are config.json's.
type Config struct {
	HiddenDim int     `json:"hidden_dim"`
	NLayers   int     `json:"n_layers"`
	NHeads    int     `json:"n_heads"`
	NKVHeads  int     `json:"n_kv_heads"`
	HeadDim   int     `json:"head_dim"`
	NExperts  int     `json:"n_experts"`
	TopK      int     `json:"top_k"`
	FFNDim    int     `json:"ffn_dim"`
	VocabSize int     `json:"vocab_size"`
	MaxSeqLen int     `json:"max_seq_len"`
	RopeBase  float64 `json:"rope_base"`
	RopeAlpha float64 `json:"rope_alpha"`
}

// Tiny is the 542,528-parameter preset; Small the 7,134,464-parameter one.
func Tiny() Config {
	return Config{64, 2, 4, 1, 16, 4, 2, 256, 1000, 512, 10000, 1}
}

// Small widens Tiny to h = 256.
func Small() Config {
	c := Tiny()
	c.HiddenDim, c.HeadDim, c.FFNDim = 256, 64, 1024
	return c
}

// Validate checks every constraint of CONTRACT §1 and what RoPE needs.
func (c Config) Validate() error {
	for _, v := range []int{c.HiddenDim, c.NLayers, c.NHeads, c.NKVHeads, c.HeadDim,
		c.NExperts, c.TopK, c.FFNDim, c.VocabSize, c.MaxSeqLen} {
		if v <= 0 || v > 1<<30 {
			return invalid("config sizes must be in 1..2^30: %+v", c)
		}
	}
	switch {
	case c.NHeads*c.HeadDim != c.HiddenDim:
		return invalid("n_heads·head_dim = %d·%d must equal hidden_dim = %d", c.NHeads, c.HeadDim, c.HiddenDim)
	case c.NHeads%c.NKVHeads != 0:
		return invalid("n_heads = %d must be divisible by n_kv_heads = %d", c.NHeads, c.NKVHeads)
	case c.TopK > c.NExperts:
		return invalid("top_k = %d must be ≤ n_experts = %d", c.TopK, c.NExperts)
	case c.HeadDim%2 != 0:
		return invalid("head_dim = %d must be even (RoPE rotates pairs)", c.HeadDim)
	case !(c.RopeBase > 0) || !(c.RopeAlpha > 0) || math.IsInf(c.RopeBase+c.RopeAlpha, 0):
		return invalid("rope_base and rope_alpha must be finite and > 0")
	case c.RopeAlpha > 1 && c.HeadDim == 2:
		return invalid("NTK RoPE scaling (rope_alpha > 1) needs head_dim > 2")
	}
	return nil
}

// TrainConfig holds the training hyper-parameters of CONTRACT §6 (train.json).
type TrainConfig struct {
	LR           float64 `json:"lr"`
	WarmupSteps  int     `json:"warmup_steps"`
	TotalSteps   int     `json:"total_steps"`
	MinLRRatio   float64 `json:"min_lr_ratio"`
	Beta1        float64 `json:"beta1"`
	Beta2        float64 `json:"beta2"`
	Eps          float64 `json:"eps"`
	WeightDecay  float64 `json:"weight_decay"`
	GradClip     float64 `json:"grad_clip"`
	AuxLossAlpha float64 `json:"aux_loss_alpha"`
	Seed         uint64  `json:"seed"`
}

// DefaultTrain returns the contract's defaults.
func DefaultTrain() TrainConfig {
	return TrainConfig{1e-3, 10, 1200, 0.1, 0.9, 0.95, 1e-8, 0.1, 1.0, 0.01, 42}
}

// Validate checks that every value is in range.
func (t TrainConfig) Validate() error {
	switch {
	case !(t.LR >= 0) || t.WarmupSteps < 0 || t.TotalSteps < 0:
		return invalid("lr, warmup_steps and total_steps must be ≥ 0")
	case !(t.MinLRRatio >= 0 && t.MinLRRatio <= 1):
		return invalid("min_lr_ratio must be in [0, 1]")
	case !(t.Beta1 >= 0 && t.Beta1 < 1) || !(t.Beta2 >= 0 && t.Beta2 < 1):
		return invalid("beta1 and beta2 must be in [0, 1)")
	case !(t.Eps > 0) || !(t.WeightDecay >= 0) || !(t.AuxLossAlpha >= 0) || t.GradClip != t.GradClip:
		return invalid("eps must be > 0; weight_decay, aux_loss_alpha ≥ 0; grad_clip a number")
	}
	return nil
}

// decodeStrict parses JSON into v, refusing unknown keys and trailing data.
func decodeStrict(path string, v any) error {
	text, err := os.ReadFile(path)
	if err != nil {
		return invalid("%v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(text))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return invalid("%s: %v", path, err)
	}
	if dec.More() {
		return invalid("%s: trailing data after the JSON value", path)
	}
	return nil
}

// LoadConfig reads and validates a config.json.
func LoadConfig(path string) (Config, error) {
	var c Config
	if err := decodeStrict(path, &c); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// LoadTrain reads train.json; missing keys keep their defaults.
func LoadTrain(path string) (TrainConfig, error) {
	t := DefaultTrain()
	if err := decodeStrict(path, &t); err != nil {
		return t, err
	}
	return t, t.Validate()
}
