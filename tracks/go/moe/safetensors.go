package moe

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
)

// A safetensors file is an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}}, then the raw little-endian data.

type stHeader struct {
	Dtype   string `json:"dtype"`
	Shape   []int  `json:"shape"`
	Offsets [2]int `json:"data_offsets"`
}

// NamedTensor is one tensor to write: F32 values or I32 values.
type NamedTensor struct {
	Name  string
	Shape []int
	F32   []float32
	I32   []int32
}

// WriteSafetensors writes tensors to path atomically (temp file + rename).
func WriteSafetensors(path string, tensors []NamedTensor) error {
	return writeSafetensors(path, tensors, nil)
}

// writeSafetensors writes tensors and, when not nil, the header's
// __metadata__ (string → string) to path atomically.
func writeSafetensors(path string, tensors []NamedTensor, metadata map[string]string) error {
	header := map[string]any{}
	if metadata != nil {
		header["__metadata__"] = metadata
	}
	var data []byte
	for _, t := range tensors {
		start, dtype := len(data), "F32"
		for _, v := range t.F32 {
			data = binary.LittleEndian.AppendUint32(data, math.Float32bits(v))
		}
		if t.I32 != nil {
			dtype = "I32"
			for _, v := range t.I32 {
				data = binary.LittleEndian.AppendUint32(data, uint32(v))
			}
		}
		header[t.Name] = stHeader{dtype, t.Shape, [2]int{start, len(data)}}
	}
	text, err := json.Marshal(header)
	if err != nil {
		return err
	}
	for len(text)%8 != 0 {
		text = append(text, ' ')
	}
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(text)))
	out = append(append(out, text...), data...)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(out); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// readSafetensors reads every F32 tensor of the file at path.
func readSafetensors(path string) (map[string]NamedTensor, error) {
	tensors, _, err := readSafetensorsMeta(path)
	return tensors, err
}

// readSafetensorsMeta reads every F32 tensor of the file at path and its
// __metadata__ (string → string; empty when absent).
func readSafetensorsMeta(path string) (map[string]NamedTensor, map[string]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, invalid("%s: %v", path, err)
	}
	bad := func(format string, args ...any) error {
		return invalid("%s: %s", path, fmt.Sprintf(format, args...))
	}
	if len(raw) < 8 {
		return nil, nil, bad("truncated safetensors file")
	}
	n := binary.LittleEndian.Uint64(raw)
	if n > uint64(len(raw)-8) {
		return nil, nil, bad("header length %d exceeds the file", n)
	}
	var header map[string]json.RawMessage
	if err := json.Unmarshal(raw[8:8+n], &header); err != nil {
		return nil, nil, bad("corrupt header: %v", err)
	}
	data, out, metadata := raw[8+n:], map[string]NamedTensor{}, map[string]string{}
	for name, msg := range header {
		if name == "__metadata__" {
			if err := json.Unmarshal(msg, &metadata); err != nil {
				return nil, nil, bad("__metadata__: %v", err)
			}
			continue
		}
		var h stHeader
		if err := json.Unmarshal(msg, &h); err != nil {
			return nil, nil, bad("%s: %v", name, err)
		}
		count := 1
		for _, s := range h.Shape {
			if s < 0 || s > 1<<31 || count > (1<<31)/max(s, 1) {
				return nil, nil, bad("%s: bad shape %v", name, h.Shape)
			}
			count *= s
		}
		a, b := h.Offsets[0], h.Offsets[1]
		if h.Dtype != "F32" || a < 0 || b < a || b > len(data) || b-a != 4*count {
			return nil, nil, bad("%s: dtype %s, offsets %v do not hold %v f32 values", name, h.Dtype, h.Offsets, h.Shape)
		}
		values := make([]float32, count)
		for i := range values {
			values[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[a+4*i:]))
		}
		out[name] = NamedTensor{Name: name, Shape: h.Shape, F32: values}
	}
	return out, metadata, nil
}

// current is checkpoint file name of dir as `moe train` left it: the copy in
// .checkpoint-commit/ while a committed save is still moving files into place
// (src/checkpoint.rs), else the file itself.
func current(dir, name string) string {
	committed := filepath.Join(dir, ".checkpoint-commit", name)
	if _, err := os.Stat(committed); err == nil {
		return committed
	}
	return filepath.Join(dir, name)
}

// readFlat reads a safetensors file that must hold exactly <name><suffix>
// for every tensor of cfg and every suffix, of the right shape and finite;
// it returns one flat buffer (Layout order) per suffix and the step recorded
// in the metadata (0 when absent).
func readFlat(path string, cfg Config, suffixes ...string) ([][]float32, int, error) {
	found, metadata, err := readSafetensorsMeta(path)
	if err != nil {
		return nil, 0, err
	}
	tensors, total := Layout(cfg)
	if len(found) != len(tensors)*len(suffixes) {
		return nil, 0, invalid("%s: %d tensors, the config needs %d", path, len(found), len(tensors)*len(suffixes))
	}
	var buffers [][]float32
	for _, suffix := range suffixes {
		flat := make([]float32, total)
		for _, t := range tensors {
			got, ok := found[t.Name+suffix]
			if !ok || fmt.Sprint(got.Shape) != fmt.Sprint(t.Shape) {
				return nil, 0, invalid("%s: tensor %s missing or not of shape %v", path, t.Name+suffix, t.Shape)
			}
			for i, v := range got.F32 {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					return nil, 0, invalid("%s: %s has a non-finite value at %d", path, t.Name+suffix, i)
				}
			}
			copy(flat[t.Offset:], got.F32)
		}
		buffers = append(buffers, flat)
	}
	step := 0
	if text, ok := metadata["step"]; ok {
		if step, err = strconv.Atoi(text); err != nil || step < 0 {
			return nil, 0, invalid("%s: metadata step %q is not a step count", path, text)
		}
	}
	return buffers, step, nil
}

// LoadCheckpoint reads a checkpoint directory written by `moe init` or `moe
// train`: config.json and model.safetensors holding exactly the tensors of §2.
func LoadCheckpoint(dir string) (*Model, error) {
	cfg, err := LoadConfig(current(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	params, _, err := readFlat(current(dir, "model.safetensors"), cfg, "")
	if err != nil {
		return nil, err
	}
	return NewModel(cfg, params[0])
}

// TrainState is state.json of a `moe train` checkpoint: the steps done, the
// training settings and the data sampler's position (not needed to take a step).
type TrainState struct {
	Step  int             `json:"step"`
	Train TrainConfig     `json:"train"`
	Data  json.RawMessage `json:"data"`
}

// LoadTraining reads a `moe train` checkpoint (CONTRACT §9) into a trainer
// that continues it: the model, both AdamW moments (optimizer.safetensors,
// <name>.m and <name>.v, v ≥ 0), the step count and the saved settings.
// Both safetensors files record the step they were written at, which must be
// state.json's: files from different saves are refused.
func LoadTraining(dir string) (*Trainer, error) {
	cfg, err := LoadConfig(current(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	statePath := current(dir, "state.json")
	state := TrainState{Train: DefaultTrain()}
	if err := decodeStrict(statePath, &state); err != nil {
		return nil, err
	}
	if state.Step < 0 {
		return nil, invalid("%s: step %d must be ≥ 0", statePath, state.Step)
	}
	// The parameters, then the moments m and v.
	var loaded [][]float32
	for _, file := range []struct {
		name     string
		suffixes []string
	}{{"model.safetensors", []string{""}}, {"optimizer.safetensors", []string{".m", ".v"}}} {
		path := current(dir, file.name)
		buffers, step, err := readFlat(path, cfg, file.suffixes...)
		if err != nil {
			return nil, err
		}
		if step != state.Step {
			return nil, invalid("%s: written at step %d but state.json says step %d (files from different saves)",
				path, step, state.Step)
		}
		loaded = append(loaded, buffers...)
	}
	params, m, v := loaded[0], loaded[1], loaded[2]
	if i := slices.IndexFunc(v, func(x float32) bool { return x < 0 }); i >= 0 {
		return nil, invalid("%s: negative second moment at flat index %d", current(dir, "optimizer.safetensors"), i)
	}
	model, err := NewModel(cfg, params)
	if err != nil {
		return nil, err
	}
	tr, err := NewTrainer(model, state.Train)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", statePath, err)
	}
	tr.Opt.M, tr.Opt.V, tr.Step = m, v, state.Step
	return tr, nil
}
