package moe

import (
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// small is a config small enough for finite differences, with GQA, NTK RoPE
// and a vocabulary that is not a power of two.
func small() Config {
	return Config{HiddenDim: 8, NLayers: 2, NHeads: 2, NKVHeads: 1, HeadDim: 4, NExperts: 3, TopK: 2,
		FFNDim: 8, VocabSize: 11, MaxSeqLen: 8, RopeBase: 10000, RopeAlpha: 2}
}

func newSmall(t *testing.T) (*Model, Batch) {
	m, err := NewModel(small(), InitParams(small(), 3))
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewBatch([][]int{{1, 4, 9, 2, 7}, {3, 3, 0, 10, 5}}, [][]int{{4, 9, 2, 7, 1}, {3, 0, 10, 5, 6}})
	if err != nil {
		t.Fatal(err)
	}
	return m, b
}

// Every tensor's largest gradient entries agree with central differences of
// the total loss (computed in float64 from float32 losses).
func TestGradientsMatchFiniteDifferences(t *testing.T) {
	m, b := newSmall(t)
	const alpha, h = 0.05, 1e-2
	grads := make([]float32, len(m.Params))
	if _, _, _, err := m.LossAndGrads(b, alpha, grads); err != nil {
		t.Fatal(err)
	}
	loss := func() float64 {
		_, l, _, err := m.LossAndGrads(b, alpha, make([]float32, len(m.Params)))
		if err != nil {
			t.Fatal(err)
		}
		return float64(l.Total())
	}
	tensors, _ := Layout(m.Cfg)
	for _, tensor := range tensors {
		best := tensor.Offset // the entry with the largest |gradient|
		for i := tensor.Offset; i < tensor.Offset+tensor.Len; i++ {
			if math.Abs(float64(grads[i])) > math.Abs(float64(grads[best])) {
				best = i
			}
		}
		orig := m.Params[best]
		m.Params[best] = orig + h
		up := loss()
		m.Params[best] = orig - h
		down := loss()
		m.Params[best] = orig
		fd, g := (up-down)/(2*h), float64(grads[best])
		if math.Abs(fd-g) > 2e-2*math.Abs(g)+2e-4 {
			t.Errorf("%s[%d]: analytic %.6g, finite difference %.6g", tensor.Name, best-tensor.Offset, g, fd)
		}
	}
}

// The KV-cached forward gives the logits of the full forward, and
// generation is deterministic for a seed.
func TestCachedForwardAndGeneration(t *testing.T) {
	m, _ := newSmall(t)
	ids := []int{5, 1, 8, 2}
	full, err := m.Forward(ids, 1)
	if err != nil {
		t.Fatal(err)
	}
	kv := NewKVCache(m.Cfg, 8)
	if _, err := m.ForwardCached(ids[:3], kv); err != nil {
		t.Fatal(err)
	}
	last, err := m.ForwardCached(ids[3:], kv)
	if err != nil {
		t.Fatal(err)
	}
	for v, x := range last {
		if d := math.Abs(float64(x - full.Logits[3*11+v])); d > 1e-5 {
			t.Fatalf("logit %d: cached %v, full %v", v, x, full.Logits[3*11+v])
		}
	}
	s := Strategy{Kind: TopP, T: 1, P: 0.9}
	a, err := Generate(m, []int{1, 2}, 8, s, 7)
	if err != nil || len(a) != 8 {
		t.Fatal(a, err)
	}
	b, _ := Generate(m, []int{1, 2}, 8, s, 7)
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("same seed, different tokens: %v %v", a, b)
		}
	}
}

func TestSamplingRules(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	logits := []float32{0.1, 3, 3, -1}
	if id, _ := PickToken(logits, Strategy{Kind: Greedy}, rng); id != 1 {
		t.Errorf("greedy ties go to the lowest id, got %d", id)
	}
	probs := []float32{float32(math.Log(0.6)), float32(math.Log(0.3)), float32(math.Log(0.1))}
	seen := map[int]bool{}
	for range 300 {
		id, _ := PickToken(probs, Strategy{Kind: TopP, T: 1, P: 0.7}, rng)
		seen[id] = true
	}
	if !seen[0] || !seen[1] || seen[2] {
		t.Errorf("top-p 0.7 must keep exactly the crossing token and those before it: %v", seen)
	}
	for range 50 {
		if id, _ := PickToken(probs, Strategy{Kind: TopK, T: 1, K: 1}, rng); id != 0 {
			t.Fatalf("top-k 1 is greedy, got %d", id)
		}
	}
}

// Past max_seq_len (8) the window slides: each token is the greedy choice of
// a plain forward over the (at most) 8 tokens before it — from a short prompt
// (cached, then sliding) and from one longer than the window (cut from the left).
func TestGenerationSlidesItsWindow(t *testing.T) {
	m, _ := newSmall(t)
	window := m.Cfg.MaxSeqLen
	for _, prompt := range [][]int{{1, 2, 3}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1}} {
		tokens, err := Generate(m, prompt, 24, Strategy{Kind: Greedy}, 0)
		if err != nil || len(tokens) != 24 || !slices.Equal(tokens[:len(prompt)], prompt) {
			t.Fatal(tokens, err)
		}
		for n := len(prompt); n < 24; n++ {
			pass, err := m.Forward(tokens[max(0, n-window):n], 1)
			if err != nil {
				t.Fatal(err)
			}
			logits := pass.Logits[len(pass.Logits)-m.Cfg.VocabSize:]
			if best, _ := PickToken(logits, Strategy{Kind: Greedy}, nil); best != tokens[n] {
				t.Fatalf("prompt %v, token %d: generated %d, a forward over its window picks %d", prompt, n, tokens[n], best)
			}
		}
	}
}

// Bad input is an ErrInvalid error, never a panic.
func TestBadInputIsAnError(t *testing.T) {
	m, b := newSmall(t)
	cfg := small()
	cfg.HeadDim = 3
	grads := make([]float32, len(m.Params))
	dir := t.TempDir()
	truncated := filepath.Join(dir, "model.safetensors")
	os.WriteFile(truncated, []byte{200, 0, 0, 0, 0, 0, 0, 0, '{'}, 0o644)
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"hidden_dim": 8, "extra": 1}`), 0o644)
	_, errCkpt := LoadCheckpoint(dir)
	_, errST := readSafetensors(truncated)
	bad := b
	bad.Targets = append([]int{11}, b.Targets[1:]...)
	_, _, _, errTarget := m.LossAndGrads(bad, 0.01, grads)
	_, errLong := m.Forward(make([]int, 9), 1)
	_, errID := m.Forward([]int{-1}, 1)
	_, errEmpty := NewBatch(nil, nil)
	_, errPrompt := Generate(m, []int{1, 2, 3}, 2, Strategy{Kind: Greedy}, 0)
	for name, err := range map[string]error{
		"config": cfg.Validate(), "checkpoint": errCkpt, "truncated": errST, "target": errTarget,
		"too long": errLong, "negative id": errID, "empty batch": errEmpty, "max length": errPrompt,
		"temperature": Strategy{Kind: Temperature, T: -1}.Validate(11),
		"top-p":       Strategy{Kind: TopP, T: 1, P: 0}.Validate(11),
		"top-k":       Strategy{Kind: TopK, T: 1, K: 12}.Validate(11),
	} {
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: want ErrInvalid, got %v", name, err)
		}
	}
}

// A checkpoint written and read back gives the same model.
func TestSafetensorsRoundTrip(t *testing.T) {
	m, _ := newSmall(t)
	dir := t.TempDir()
	var tensors []NamedTensor
	layout, _ := Layout(m.Cfg)
	for _, x := range layout {
		tensors = append(tensors, NamedTensor{Name: x.Name, Shape: x.Shape, F32: m.Params[x.Offset : x.Offset+x.Len]})
	}
	cfg := `{"hidden_dim": 8, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4, "n_experts": 3,
	  "top_k": 2, "ffn_dim": 8, "vocab_size": 11, "max_seq_len": 8, "rope_base": 10000, "rope_alpha": 2}`
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o644)
	if err := WriteSafetensors(filepath.Join(dir, "model.safetensors"), tensors); err != nil {
		t.Fatal(err)
	}
	back, err := LoadCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range back.Params {
		if v != m.Params[i] {
			t.Fatalf("parameter %d: %v read back as %v", i, m.Params[i], v)
		}
	}
}

// Same seed → bit-identical weights, losses and gradients; another seed differs.
func TestSameSeedSameBits(t *testing.T) {
	a, b := InitParams(small(), 5), InitParams(small(), 5)
	if !slices.Equal(a, b) || slices.Equal(a, InitParams(small(), 6)) {
		t.Fatal("InitParams is not a function of the seed")
	}
	m, batch := newSmall(t)
	run := func() ([]float32, Losses) {
		g := make([]float32, len(m.Params))
		_, l, _, err := m.LossAndGrads(batch, 0.01, g)
		if err != nil {
			t.Fatal(err)
		}
		return g, l
	}
	g1, l1 := run()
	g2, l2 := run()
	if l1 != l2 || !slices.Equal(g1, g2) {
		t.Fatal("two identical steps gave different bits")
	}
}

// saveTraining writes what `moe train` saves (CONTRACT §9) by hand: config.json,
// model.safetensors, optimizer.safetensors (<name>.m, <name>.v) and state.json,
// the two safetensors files tagged with the given steps.
func saveTraining(t *testing.T, dir string, tr *Trainer, modelStep, optStep int) {
	t.Helper()
	layout, _ := Layout(tr.Model.Cfg)
	var params, moments []NamedTensor
	for _, x := range layout {
		at := func(flat []float32) []float32 { return flat[x.Offset : x.Offset+x.Len] }
		params = append(params, NamedTensor{Name: x.Name, Shape: x.Shape, F32: at(tr.Model.Params)})
		moments = append(moments, NamedTensor{Name: x.Name + ".m", Shape: x.Shape, F32: at(tr.Opt.M)},
			NamedTensor{Name: x.Name + ".v", Shape: x.Shape, F32: at(tr.Opt.V)})
	}
	config, _ := json.Marshal(tr.Model.Cfg)
	state, _ := json.Marshal(TrainState{Step: tr.Step, Train: tr.Cfg, Data: json.RawMessage("null")})
	for _, err := range []error{
		os.WriteFile(filepath.Join(dir, "config.json"), config, 0o644),
		os.WriteFile(filepath.Join(dir, "state.json"), state, 0o644),
		writeSafetensors(filepath.Join(dir, "model.safetensors"), params, map[string]string{"step": strconv.Itoa(modelStep)}),
		writeSafetensors(filepath.Join(dir, "optimizer.safetensors"), moments, map[string]string{"step": strconv.Itoa(optStep)}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// A run saved after two steps and resumed for a third gives the bits of
// three steps taken without stopping: weights and both moments.
func TestResumingASavedRunEqualsNeverStopping(t *testing.T) {
	tc := DefaultTrain()
	tc.LR, tc.WarmupSteps, tc.Beta2, tc.WeightDecay = 1e-2, 1, 0.999, 0.05
	run := func(steps int, tr *Trainer) *Trainer {
		_, b := newSmall(t)
		for i := 0; i < steps; i++ {
			if _, _, err := tr.TrainStep(b); err != nil {
				t.Fatal(err)
			}
		}
		return tr
	}
	fresh := func() *Trainer {
		m, _ := newSmall(t)
		tr, err := NewTrainer(m, tc)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	straight, first := run(3, fresh()), run(2, fresh())
	dir := t.TempDir()
	saveTraining(t, dir, first, 2, 2)
	resumed, err := LoadTraining(dir)
	if err != nil {
		t.Fatal(err)
	}
	if resumed.Step != 2 || resumed.Cfg != tc {
		t.Fatalf("resumed at step %d with %+v, want step 2 with %+v", resumed.Step, resumed.Cfg, tc)
	}
	run(1, resumed)
	if !slices.Equal(resumed.Model.Params, straight.Model.Params) || !slices.Equal(resumed.Opt.M, straight.Opt.M) ||
		!slices.Equal(resumed.Opt.V, straight.Opt.V) {
		t.Fatal("the resumed step differs from the uninterrupted one")
	}
}

// A training checkpoint that is incomplete, inconsistent or out of range is
// an ErrInvalid error.
func TestBadTrainingCheckpointsAreErrors(t *testing.T) {
	m, b := newSmall(t)
	tr, _ := NewTrainer(m, DefaultTrain())
	if _, _, err := tr.TrainStep(b); err != nil {
		t.Fatal(err)
	}
	write := func(name, text string) func(string) {
		return func(dir string) { os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644) }
	}
	for what, breakage := range map[string]func(string){
		"files from different saves": func(dir string) { saveTraining(t, dir, tr, 1, 0) },
		"unknown state key":          write("state.json", `{"step": 1, "train": {}, "epoch": 3}`),
		"invalid settings":           write("state.json", `{"step": 1, "train": {"beta2": 1.5}}`),
		"negative step":              write("state.json", `{"step": -1, "train": {}}`),
		"no optimizer":               func(dir string) { os.Remove(filepath.Join(dir, "optimizer.safetensors")) },
		"no moments in it": func(dir string) {
			params, _ := os.ReadFile(filepath.Join(dir, "model.safetensors"))
			os.WriteFile(filepath.Join(dir, "optimizer.safetensors"), params, 0o644)
		},
		"negative v": func(dir string) {
			v := slices.Clone(tr.Opt.V)
			tr.Opt.V[7] = -1
			saveTraining(t, dir, tr, 1, 1)
			tr.Opt.V = v
		},
	} {
		dir := t.TempDir()
		saveTraining(t, dir, tr, 1, 1)
		if _, err := LoadTraining(dir); err != nil {
			t.Fatalf("%s: the intact checkpoint does not load: %v", what, err)
		}
		breakage(dir)
		if _, err := LoadTraining(dir); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: want ErrInvalid, got %v", what, err)
		}
	}
}

// 1 − β is formed in float64 and then rounded: after one step from zero
// moments on g = 1, m = float32(1 − β1) and v = float32(1 − β2) exactly
// (1 − float32(0.999) would be 1.3e-5 off, and the resume parity case fails).
func TestMomentCoefficientsAreRoundedOnce(t *testing.T) {
	tc := DefaultTrain()
	tc.Beta2 = 0.999
	opt := NewAdamW(small())
	params, grads := make([]float32, len(opt.M)), make([]float32, len(opt.M))
	for i := range grads {
		grads[i] = 1
	}
	opt.Update(params, grads, 1, 1e-3, 1, tc)
	if opt.M[0] != float32(1-tc.Beta1) || opt.V[0] != float32(1-tc.Beta2) {
		t.Fatalf("m = %v, v = %v; want %v, %v", opt.M[0], opt.V[0], float32(1-tc.Beta1), float32(1-tc.Beta2))
	}
}
