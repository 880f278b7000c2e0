package moe

// The kernels the benchmark's compiler axis times, exported.

// MatMul: C [m, n] = A [m, k]·B [k, n].
func MatMul(c, a, b []float32, m, k, n int) { gemm(false, false, m, n, k, a, k, b, n, 0, c, n) }

// Softmax: x ← softmax(x) in place.
func Softmax(x []float32) { softmax(x, 1) }

// RMSNorm: y [T, h], invRMS [T] from x [T, h] and γ [h].
func RMSNorm(y, invRMS, x, gamma []float32) { rmsnormForward(y, invRMS, x, gamma) }
