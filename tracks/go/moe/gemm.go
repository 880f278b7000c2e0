//go:build !cblas

package moe

// gemm: C[m,n] = β·C + op(A)·op(B), row-major with leading dimensions, where
// op(X) is X or Xᵀ and β is 0 or 1 (the sgemm contract, so the cblas build
// can hand it to OpenBLAS). Pure Go: each case is arranged so its inner loop
// runs over contiguous memory, four rows of B at a time.
func gemm(transA, transB bool, m, n, k int, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	for i := 0; i < m; i++ {
		crow := c[i*ldc : i*ldc+n]
		if beta == 0 {
			clear(crow)
		}
		at := func(p int) float32 { // A(i, p)
			if transA {
				return a[p*lda+i]
			}
			return a[i*lda+p]
		}
		switch {
		case !transB: // C_i += Σ_p A(i,p)·B_p  (rows of B)
			p := 0
			for ; p+4 <= k; p += 4 {
				axpy4(crow, at(p), at(p+1), at(p+2), at(p+3),
					b[p*ldb:p*ldb+n], b[(p+1)*ldb:(p+1)*ldb+n], b[(p+2)*ldb:(p+2)*ldb+n], b[(p+3)*ldb:(p+3)*ldb+n])
			}
			for ; p < k; p++ {
				axpy(crow, at(p), b[p*ldb:p*ldb+n])
			}
		case !transA: // C_ij += A_i · B_j  (B stored [n, k]), four columns at a time
			arow, j := a[i*lda:i*lda+k], 0
			for ; j+4 <= n; j += 4 {
				dot4(crow[j:j+4], arow, b[j*ldb:], b[(j+1)*ldb:], b[(j+2)*ldb:], b[(j+3)*ldb:])
			}
			for ; j < n; j++ {
				crow[j] += dot(arow, b[j*ldb:j*ldb+k])
			}
		default:
			for j := 0; j < n; j++ {
				var s float32
				for p := 0; p < k; p++ {
					s += at(p) * b[j*ldb+p]
				}
				crow[j] += s
			}
		}
	}
}

// axpy4: y += a0·x0 + a1·x1 + a2·x2 + a3·x3 (one pass over y).
func axpy4(y []float32, a0, a1, a2, a3 float32, x0, x1, x2, x3 []float32) {
	x0, x1, x2, x3 = x0[:len(y)], x1[:len(y)], x2[:len(y)], x3[:len(y)]
	for j := range y {
		y[j] += a0*x0[j] + a1*x1[j] + a2*x2[j] + a3*x3[j]
	}
}

// dot4: c_j += a·b_j for four rows b_j (one pass over a).
func dot4(c, a, b0, b1, b2, b3 []float32) {
	b0, b1, b2, b3 = b0[:len(a)], b1[:len(a)], b2[:len(a)], b3[:len(a)]
	var s0, s1, s2, s3 float32
	for p, av := range a {
		s0 += av * b0[p]
		s1 += av * b1[p]
		s2 += av * b2[p]
		s3 += av * b3[p]
	}
	c[0], c[1], c[2], c[3] = c[0]+s0, c[1]+s1, c[2]+s2, c[3]+s3
}

// BLAS names the matrix-product backend of this build.
const BLAS = "pure Go"
