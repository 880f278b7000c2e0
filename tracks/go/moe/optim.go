package moe

import "math"

// LearningRate at step t (1-based):
//
//	t ≤ warmup: lr·t/warmup;  after: progress = min(1, (t − warmup)/(total − warmup)),
//	lr_t = min_lr + ½(lr − min_lr)(1 + cos(π·progress)),  min_lr = min_lr_ratio·lr
func LearningRate(tc TrainConfig, t int) float64 {
	if t <= tc.WarmupSteps {
		return tc.LR * float64(t) / float64(tc.WarmupSteps)
	}
	progress := 1.0
	if tc.TotalSteps > tc.WarmupSteps {
		progress = min(1, float64(t-tc.WarmupSteps)/float64(tc.TotalSteps-tc.WarmupSteps))
	}
	minLR := tc.MinLRRatio * tc.LR
	return minLR + 0.5*(tc.LR-minLR)*(1+math.Cos(math.Pi*progress))
}

// clipScale is the factor clipping multiplies every gradient by:
// c/(norm + 1e-6) when norm > c > 0, else 1.
func clipScale(norm float32, clip float64) float32 {
	if clip > 0 && float64(norm) > clip {
		return float32(clip / (float64(norm) + 1e-6))
	}
	return 1
}

// AdamW holds the two moments (flat, Layout order) and which tensors decay.
type AdamW struct {
	M, V    []float32
	tensors []Tensor
}

// NewAdamW returns zeroed moments for cfg.
func NewAdamW(cfg Config) *AdamW {
	tensors, total := Layout(cfg)
	return &AdamW{make([]float32, total), make([]float32, total), tensors}
}

// Update takes one step t (1-based) on gradients scaled by s (the clip factor):
//
//	g ← s·g;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
//	p ← p − lr·wd·p (2-D weights only);  p ← p − lr·(m/(1−β1ᵗ))/(sqrt(v/(1−β2ᵗ)) + eps)
//
// 1 − β is formed in float64 before rounding: 1 − float32(β) is off by up to
// ulp(β)/(1 − β) relative (1.3e-5 for β = 0.999), which the moments would carry.
func (o *AdamW) Update(params, grads []float32, s float32, lr float64, t int, tc TrainConfig) {
	b1, b2, eps, rate := float32(tc.Beta1), float32(tc.Beta2), float32(tc.Eps), float32(lr)
	c1, c2 := float32(1-tc.Beta1), float32(1-tc.Beta2)
	inv1 := float32(1 / (1 - math.Pow(tc.Beta1, float64(t))))
	inv2 := float32(1 / (1 - math.Pow(tc.Beta2, float64(t))))
	for _, tensor := range o.tensors {
		decay := float32(0)
		if len(tensor.Shape) == 2 {
			decay = float32(lr * tc.WeightDecay)
		}
		for i := tensor.Offset; i < tensor.Offset+tensor.Len; i++ {
			g := grads[i] * s
			o.M[i] = b1*o.M[i] + c1*g
			o.V[i] = b2*o.V[i] + c2*g*g
			p := params[i] - decay*params[i]
			params[i] = p - rate*(o.M[i]*inv1)/(float32(math.Sqrt(float64(o.V[i]*inv2)))+eps)
		}
	}
}

// StepStats is what one training step reports.
type StepStats struct {
	Loss, CE, Aux, GradNorm float32
	LR                      float64
}

// Trainer is a model with its gradient buffer, optimizer and step counter.
type Trainer struct {
	Model *Model
	Cfg   TrainConfig
	Opt   *AdamW
	Step  int
	Grads []float32
}

// NewTrainer starts at step 0 with zeroed moments.
func NewTrainer(m *Model, tc TrainConfig) (*Trainer, error) {
	if err := tc.Validate(); err != nil {
		return nil, err
	}
	return &Trainer{m, tc, NewAdamW(m.Cfg), 0, make([]float32, len(m.Params))}, nil
}

// TrainStep: forward → loss → backward → clip → AdamW (CONTRACT §6). A
// non-finite loss or gradient refuses the step and leaves everything as it was.
func (tr *Trainer) TrainStep(b Batch) (StepStats, *Pass, error) {
	p, losses, sumSq, err := tr.Model.LossAndGrads(b, float32(tr.Cfg.AuxLossAlpha), tr.Grads)
	if err != nil {
		return StepStats{}, nil, err
	}
	norm := float32(math.Sqrt(sumSq))
	if math.IsNaN(float64(norm)) || math.IsInf(float64(norm), 0) {
		return StepStats{}, nil, invalid("non-finite gradient norm at step %d", tr.Step+1)
	}
	t := tr.Step + 1
	lr := LearningRate(tr.Cfg, t)
	tr.Opt.Update(tr.Model.Params, tr.Grads, clipScale(norm, tr.Cfg.GradClip), lr, t, tr.Cfg)
	tr.Step = t
	return StepStats{losses.Total(), losses.CE, losses.Aux, norm, lr}, p, nil
}
