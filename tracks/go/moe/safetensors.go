package moe

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
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
	header := map[string]stHeader{}
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
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	bad := func(format string, args ...any) error {
		return invalid("%s: %s", path, fmt.Sprintf(format, args...))
	}
	if len(raw) < 8 {
		return nil, bad("truncated safetensors file")
	}
	n := binary.LittleEndian.Uint64(raw)
	if n > uint64(len(raw)-8) {
		return nil, bad("header length %d exceeds the file", n)
	}
	var header map[string]json.RawMessage
	if err := json.Unmarshal(raw[8:8+n], &header); err != nil {
		return nil, bad("corrupt header: %v", err)
	}
	data, out := raw[8+n:], map[string]NamedTensor{}
	for name, msg := range header {
		if name == "__metadata__" {
			continue
		}
		var h stHeader
		if err := json.Unmarshal(msg, &h); err != nil {
			return nil, bad("%s: %v", name, err)
		}
		count := 1
		for _, s := range h.Shape {
			if s < 0 || s > 1<<31 || count > (1<<31)/max(s, 1) {
				return nil, bad("%s: bad shape %v", name, h.Shape)
			}
			count *= s
		}
		a, b := h.Offsets[0], h.Offsets[1]
		if h.Dtype != "F32" || a < 0 || b < a || b > len(data) || b-a != 4*count {
			return nil, bad("%s: dtype %s, offsets %v do not hold %v f32 values", name, h.Dtype, h.Offsets, h.Shape)
		}
		values := make([]float32, count)
		for i := range values {
			values[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[a+4*i:]))
		}
		out[name] = NamedTensor{Name: name, Shape: h.Shape, F32: values}
	}
	return out, nil
}

// LoadCheckpoint reads a checkpoint directory written by `moe init` or `moe
// train`: config.json and model.safetensors holding exactly the tensors of §2.
func LoadCheckpoint(dir string) (*Model, error) {
	cfg, err := LoadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "model.safetensors")
	found, err := readSafetensors(path)
	if err != nil {
		return nil, err
	}
	tensors, total := Layout(cfg)
	if len(found) != len(tensors) {
		return nil, invalid("%s: %d tensors, the config needs %d", path, len(found), len(tensors))
	}
	flat := make([]float32, total)
	for _, t := range tensors {
		got, ok := found[t.Name]
		if !ok || fmt.Sprint(got.Shape) != fmt.Sprint(t.Shape) {
			return nil, invalid("%s: tensor %s missing or not of shape %v", path, t.Name, t.Shape)
		}
		for i, v := range got.F32 {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return nil, invalid("%s: %s has a non-finite value at %d", path, t.Name, i)
			}
		}
		copy(flat[t.Offset:], got.F32)
	}
	return NewModel(cfg, flat)
}
