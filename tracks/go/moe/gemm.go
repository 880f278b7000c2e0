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
		case !transA: // C_ij += A_i · B_j  (B stored [n, k])
			arow := a[i*lda : i*lda+k]
			for j := 0; j < n; j++ {
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

// BLAS names the matrix-product backend of this build.
const BLAS = "pure Go"
