package moe

import (
	"fmt"
	"math"
	"testing"
)

// gemm agrees with the naive triple loop in all four transpose cases.
func TestGemmMatchesTheDefinition(t *testing.T) {
	m, n, k := 5, 7, 6
	a, b := make([]float32, m*k), make([]float32, k*n)
	for i := range a {
		a[i] = float32(i%7) - 3
	}
	for i := range b {
		b[i] = float32(i%5)*0.5 - 1
	}
	for _, ta := range []bool{false, true} {
		for _, tb := range []bool{false, true} {
			lda, ldb := k, n
			if ta {
				lda = m
			}
			if tb {
				ldb = k
			}
			c := make([]float32, m*n)
			for i := range c {
				c[i] = 1
			}
			gemm(ta, tb, m, n, k, a, lda, b, ldb, 1, c, n)
			for i := 0; i < m; i++ {
				for j := 0; j < n; j++ {
					want := float32(1)
					for p := 0; p < k; p++ {
						av, bv := a[i*lda+p], b[p*ldb+j]
						if ta {
							av = a[p*lda+i]
						}
						if tb {
							bv = b[j*ldb+p]
						}
						want += av * bv
					}
					if math.Abs(float64(c[i*n+j]-want)) > 1e-4 {
						t.Fatalf("transA %v transB %v: C[%d,%d] = %v, want %v", ta, tb, i, j, c[i*n+j], want)
					}
				}
			}
		}
	}
}

// BenchmarkGemm times the model's matrix products (tokens T, in, out) for
// the linear layers of the tiny and small presets, forward (x·Wᵀ) and the
// two backward products (dyᵀ·x and dy·W).
func BenchmarkGemm(b *testing.B) {
	shapes := []struct {
		name       string
		t, in, out int
	}{
		{"tiny_qkv_T64", 64, 64, 64}, {"tiny_expert_T32", 32, 64, 256}, {"tiny_lm_head_T64", 64, 64, 1000},
		{"small_expert_T32", 32, 256, 1024}, {"small_lm_head_T64", 64, 256, 1000},
	}
	for _, s := range shapes {
		x, w, y := make([]float32, s.t*s.in), make([]float32, s.out*s.in), make([]float32, s.t*s.out)
		for _, op := range []string{"forward", "backward"} {
			b.Run(fmt.Sprintf("%s_%s", s.name, op), func(b *testing.B) {
				flops := 2 * s.t * s.in * s.out
				for b.Loop() {
					if op == "forward" {
						linearForward(y, x, w, s.t, s.in, s.out, false)
					} else {
						linearBackward(x, w, y, x, w, s.t, s.in, s.out, false)
					}
				}
				if op == "backward" {
					flops *= 2
				}
				b.ReportMetric(float64(flops)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
			})
		}
	}
}
