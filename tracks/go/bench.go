package main

import (
	"bytes"
	"compress/gzip"
	"embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"runtime"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"rosettamoe/moe"
)

//go:embed *.go moe/*.go
var sources embed.FS

// scenario is one of the 22 of CONTRACT §10.
type scenario struct {
	ID, Axis, Op, Config string
	Batch, Seq, Threads  int
}

func scenarios() []scenario {
	out := []scenario{{"mem_train_step", "memory", "train_step", "tiny", 2, 8, 0}}
	for _, b := range []int{1, 2, 4, 8} {
		out = append(out, scenario{fmt.Sprintf("mem_scale_batch_%d", b), "memory", "forward", "tiny", b, 32, 0})
	}
	for _, s := range []int{8, 16, 32, 64} {
		out = append(out, scenario{fmt.Sprintf("mem_scale_seq_%d", s), "memory", "forward", "tiny", 2, s, 0})
	}
	out = append(out, scenario{"kernel_matmul", "compiler", "matmul", "", 0, 0, 0},
		scenario{"kernel_softmax", "compiler", "softmax", "", 0, 0, 0},
		scenario{"kernel_rmsnorm", "compiler", "rmsnorm", "", 0, 0, 0},
		scenario{"dispatch_warm", "type_system", "forward", "tiny", 2, 32, 0},
		scenario{"dispatch_cold", "type_system", "build + first forward", "tiny", 1, 8, 0})
	for _, t := range []int{1, 2, 4} {
		out = append(out, scenario{fmt.Sprintf("parallel_T%d", t), "parallel", "forward", "tiny", 2, 32, t})
	}
	for _, t := range []int{1, 2, 4} {
		out = append(out, scenario{fmt.Sprintf("parallel_train_T%d", t), "parallel", "train_step", "tiny", 2, 8, t})
	}
	return append(out, scenario{"scale_forward_256", "scale", "forward", "small", 2, 32, 0},
		scenario{"scale_train_256", "scale", "train_step", "small", 2, 8, 0})
}

func preset(name string) moe.Config {
	if name == "small" {
		return moe.Small()
	}
	return moe.Tiny()
}

// params is the scenario's "params" object, as moe bench writes it.
func (s scenario) params() map[string]any {
	switch s.Op {
	case "matmul":
		return map[string]any{"op": "matmul", "m": 64, "k": 64, "n": 64}
	case "softmax":
		return map[string]any{"op": "softmax", "n": 1000}
	case "rmsnorm":
		return map[string]any{"op": "rmsnorm", "shape": []int{2, 32, 64}}
	}
	p := map[string]any{"config": s.Config, "op": s.Op, "batch": s.Batch, "seq_len": s.Seq}
	if s.Threads > 0 {
		p["threads"] = s.Threads
	}
	return p
}

// forwardFlops counts matrix FLOPs of one forward (multiply-add = 2,
// full-square attention, active experts only), as CONTRACT §10.
func forwardFlops(c moe.Config, b, s int) float64 {
	h, t, hd := float64(c.HiddenDim), float64(b*s), float64(c.NHeads*c.HeadDim)
	qkv := float64((c.NHeads + 2*c.NKVHeads) * c.HeadDim)
	layer := 2*t*h*qkv + 2*t*hd*h + 4*float64(b*c.NHeads*s*s*c.HeadDim) + routerFlops(c, b, s) +
		t*float64(c.TopK)*6*h*float64(c.FFNDim)
	return float64(c.NLayers)*layer + 2*t*h*float64(c.VocabSize)
}

func routerFlops(c moe.Config, b, s int) float64 { return 2 * float64(b*s*c.HiddenDim*c.NExperts) }

// trainFlops: forward + a backward of twice the forward, routers' backward not counted.
func trainFlops(c moe.Config, b, s int) float64 {
	return 3*forwardFlops(c, b, s) - 2*float64(c.NLayers)*routerFlops(c, b, s)
}

func (s scenario) flops() float64 {
	c, n := preset(s.Config), float64(max(s.Threads, 1))
	switch s.Op {
	case "matmul":
		return 524288
	case "softmax":
		return 4000
	case "rmsnorm":
		return 12288
	case "train_step":
		return n * trainFlops(c, s.Batch, s.Seq)
	}
	return n * forwardFlops(c, s.Batch, s.Seq)
}

func (s scenario) tokens() int {
	switch s.Op {
	case "matmul", "rmsnorm":
		return 64
	case "softmax":
		return 1
	}
	return max(s.Threads, 1) * s.Batch * s.Seq
}

// runner is a prepared workload: run it, then read what its last run produced.
type runner struct {
	run    func() error
	output func() []float32
}

// inputs: flat index i over B·S, id = i mod 1000, target = (i+1) mod 1000.
func inputs(b, s int) moe.Batch {
	batch := moe.Batch{B: b, S: s}
	for i := 0; i < b*s; i++ {
		batch.IDs, batch.Targets = append(batch.IDs, i%1000), append(batch.Targets, (i+1)%1000)
	}
	return batch
}

func normals(n int, seed uint64) []float32 {
	rng, out := rand.New(rand.NewPCG(seed, 0)), make([]float32, n)
	for i := range out {
		out[i] = float32(rng.NormFloat64())
	}
	return out
}

// prepare builds the scenario's workload (untimed). Parallel scenarios run
// one model or trainer per goroutine, each on its own data.
func (s scenario) prepare(seed uint64) (runner, error) {
	c := preset(s.Config)
	switch {
	case s.Threads > 0:
		one := s
		one.Threads = 0
		runners := make([]runner, s.Threads)
		for i := range runners {
			r, err := one.prepare(seed)
			if err != nil {
				return runner{}, err
			}
			runners[i] = r
		}
		return runner{func() error {
			var wg sync.WaitGroup
			errs := make([]error, len(runners))
			for i, r := range runners {
				wg.Go(func() { errs[i] = r.run() })
			}
			wg.Wait()
			return errors.Join(errs...)
		}, runners[0].output}, nil
	case s.Op == "matmul":
		a, b, out := normals(64*64, seed), normals(64*64, seed+1), make([]float32, 64*64)
		return runner{func() error { moe.MatMul(out, a, b, 64, 64, 64); return nil }, func() []float32 { return out }}, nil
	case s.Op == "softmax":
		in, out := normals(1000, seed), make([]float32, 1000)
		return runner{func() error { copy(out, in); moe.Softmax(out); return nil }, func() []float32 { return out }}, nil
	case s.Op == "rmsnorm":
		x, gamma, y, r := normals(2*32*64, seed), make([]float32, 64), make([]float32, 2*32*64), make([]float32, 64)
		for i := range gamma {
			gamma[i] = 1
		}
		return runner{func() error { moe.RMSNorm(y, r, x, gamma); return nil }, func() []float32 { return y }}, nil
	case s.Op == "build + first forward":
		var logits []float32
		return runner{func() error {
			m, err := moe.NewModel(c, moe.InitParams(c, seed))
			if err != nil {
				return err
			}
			p, err := m.Forward(inputs(1, 8).IDs, 1)
			if err == nil {
				logits = p.Logits
			}
			return err
		}, func() []float32 { return logits }}, nil
	}
	m, err := moe.NewModel(c, moe.InitParams(c, seed))
	if err != nil {
		return runner{}, err
	}
	batch := inputs(s.Batch, s.Seq)
	if s.Op == "forward" {
		var logits []float32
		return runner{func() error {
			p, err := m.Forward(batch.IDs, batch.B)
			if err == nil {
				logits = p.Logits
			}
			return err
		}, func() []float32 { return logits }}, nil
	}
	tc := moe.DefaultTrain()
	tc.Seed = seed
	tr, err := moe.NewTrainer(m, tc)
	last := []float32{}
	return runner{func() error {
		st, _, err := tr.TrainStep(batch)
		last = []float32{st.Loss, st.CE, st.Aux, st.GradNorm}
		return err
	}, func() []float32 { return last }}, err
}

// result is one scenario's JSON, in moe bench's schema.
type result struct {
	ID         string            `json:"id"`
	Axis       string            `json:"axis"`
	Params     map[string]any    `json:"params"`
	WarmupRuns int               `json:"warmup_runs"`
	TrialRuns  int               `json:"trial_runs"`
	Reps       int               `json:"reps_per_trial"`
	Timings    []uint64          `json:"timings_ns"`
	CPUTimes   []uint64          `json:"cpu_times_ns"`
	Median     uint64            `json:"median_ns"`
	P95        uint64            `json:"p95_ns"`
	Min        uint64            `json:"min_ns"`
	Max        uint64            `json:"max_ns"`
	IQR        uint64            `json:"iqr_ns"`
	CPUMedian  uint64            `json:"cpu_median_ns"`
	Memory     map[string]uint64 `json:"memory"`
	GC         map[string]uint64 `json:"gc"`
	Numerical  map[string]any    `json:"numerical"`
	Throughput float64           `json:"throughput_tokens_per_sec"`
	Derived    map[string]any    `json:"derived"`
}

// cpuAndRSS returns user+system CPU time (ns) and peak RSS (bytes) of this process.
func cpuAndRSS() (uint64, uint64) {
	var u syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &u) != nil {
		return 0, 0
	}
	return uint64(u.Utime.Nano() + u.Stime.Nano()), uint64(u.Maxrss) * 1024
}

// gcCPU is the CPU time the garbage collector has used so far (ns).
func gcCPU() uint64 {
	sample := []metrics.Sample{{Name: "/cpu/classes/gc/total:cpu-seconds"}}
	metrics.Read(sample)
	if sample[0].Value.Kind() != metrics.KindFloat64 {
		return 0
	}
	return uint64(sample[0].Value.Float64() * 1e9)
}

// measure runs one scenario in this process: warm-ups, then timed trials
// (a run under a millisecond is repeated until a trial lasts about one).
func measure(s scenario, trials, warmup int, seed uint64) (result, error) {
	r, err := s.prepare(seed)
	for i := 0; i < warmup && err == nil; i++ {
		err = r.run()
	}
	if err != nil {
		return result{}, err
	}
	probe := time.Now()
	if err := r.run(); err != nil {
		return result{}, err
	}
	reps := 1
	if once := time.Since(probe); once < time.Millisecond {
		reps = int(time.Millisecond/max(once, 1)) + 1
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	gcBefore := gcCPU()
	wall, cpu, total := make([]uint64, trials), make([]uint64, trials), uint64(0)
	for i := range wall {
		cpu0, _ := cpuAndRSS()
		start := time.Now()
		for j := 0; j < reps && err == nil; j++ {
			err = r.run()
		}
		elapsed := uint64(time.Since(start))
		cpu1, _ := cpuAndRSS()
		wall[i], cpu[i], total = elapsed/uint64(reps), (cpu1-cpu0)/uint64(reps), total+elapsed
	}
	gcTime := gcCPU() - gcBefore
	runtime.ReadMemStats(&after)
	if err != nil {
		return result{}, err
	}
	_, rss := cpuAndRSS()
	st, runs := stats(wall), uint64(trials*reps)
	medianS := float64(st[0]) / 1e9
	alloc := (after.TotalAlloc - before.TotalAlloc) / runs
	pauses := after.PauseTotalNs - before.PauseTotalNs
	nan, inf, maxAbs := 0, 0, 0.0
	for _, v := range r.output() {
		switch f := float64(v); {
		case math.IsNaN(f):
			nan++
		case math.IsInf(f, 0):
			inf++
		default:
			maxAbs = max(maxAbs, math.Abs(f))
		}
	}
	return result{
		ID: s.ID, Axis: s.Axis, Params: s.params(), WarmupRuns: warmup, TrialRuns: trials, Reps: reps,
		Timings: wall, CPUTimes: cpu, Median: st[0], P95: st[1], Min: st[2], Max: st[3], IQR: st[4],
		CPUMedian: stats(cpu)[0],
		Memory:    map[string]uint64{"peak_rss_bytes": rss, "alloc_bytes": alloc},
		// Stop-the-world pause time (PauseTotalNs) and collections (NumGC)
		// during the timed trials; gc_cpu_time_ns adds the concurrent marking.
		GC: map[string]uint64{"total_gc_time_ns": pauses, "gc_pause_count": uint64(after.NumGC - before.NumGC),
			"gc_cpu_time_ns": gcTime},
		Numerical:  map[string]any{"nan_count": nan, "inf_count": inf, "max_abs": maxAbs},
		Throughput: float64(s.tokens()) / medianS,
		Derived: map[string]any{"alloc_rate_bytes_per_sec": float64(alloc) / medianS,
			"gc_throughput": 1 - float64(pauses)/float64(total), "gflops": s.flops() / medianS / 1e9,
			"cores_used": min(max(s.Threads, 1), runtime.NumCPU())},
	}, nil
}

// stats: median, p95, min, max and IQR of a sample (nearest-rank percentiles).
func stats(sample []uint64) [5]uint64 {
	s := slices.Clone(sample)
	slices.Sort(s)
	at := func(q float64) uint64 { return s[int(math.Round(q*float64(len(s)-1)))] }
	median := s[len(s)/2]
	if len(s)%2 == 0 {
		median = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return [5]uint64{median, at(0.95), s[0], s[len(s)-1], at(0.75) - at(0.25)}
}

// staticMetrics measures this track's own source (tests excluded), as the
// Rust suite measures src/: gzip bytes, lines that are neither blank nor
// comment-only, top-level func declarations, files.
func staticMetrics() map[string]int {
	var all []byte
	files, sloc, funcs := 0, 0, 0
	fs.WalkDir(sources, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(p, "_test.go") {
			return err
		}
		text, _ := sources.ReadFile(p)
		all, files = append(all, text...), files+1
		for _, line := range strings.Split(string(text), "\n") {
			line = strings.TrimSpace(line)
			if line != "" && !strings.HasPrefix(line, "//") {
				sloc++
			}
			if strings.HasPrefix(line, "func ") {
				funcs++
			}
		}
		return nil
	})
	var z bytes.Buffer
	w := gzip.NewWriter(&z)
	w.Write(all)
	w.Close()
	return map[string]int{"source_gzip_bytes": z.Len(), "sloc": sloc, "function_count": funcs, "files": files}
}

var sink float32

// scalarPeak measures the multiply-add throughput of scalar Go code (GFLOP/s).
func scalarPeak() float64 {
	var a [8]float32
	start, n := time.Now(), 0
	for time.Since(start) < 200*time.Millisecond {
		for i := 0; i < 1<<16; i++ {
			for j := range a {
				a[j] = a[j]*0.999 + 0.001
			}
		}
		n++
	}
	sink = a[0]
	return float64(n) * (1 << 16) * 16 / time.Since(start).Seconds() / 1e9
}

func bench(args []string) error {
	flags := flag.NewFlagSet("bench", flag.ContinueOnError)
	jsonPath := flags.String("json", "", "write the results as JSON to FILE")
	glob := flags.String("scenario", "*", "only scenarios whose id matches this pattern (* is a wildcard)")
	trials := flags.Int("trials", 10, "timed trials per scenario")
	warmup := flags.Int("warmup", 3, "warm-up runs per scenario")
	seed := flags.Uint64("seed", 42, "seed of the models and inputs")
	quick := flags.Bool("quick", false, "3 trials after 1 warm-up, for smoke runs")
	child := flags.String("child", "", "internal: measure one scenario in this process, print its JSON")
	if err := parse(flags, args); err != nil {
		return err
	}
	if *quick {
		*trials, *warmup = 3, 1
	}
	if *trials < 1 || *warmup < 0 {
		return fmt.Errorf("--trials must be ≥ 1 and --warmup ≥ 0")
	}
	var chosen []scenario
	for _, s := range scenarios() {
		if ok, _ := path.Match(*glob, s.ID); ok || s.ID == *child {
			chosen = append(chosen, s)
		}
	}
	if *child != "" {
		i := slices.IndexFunc(chosen, func(s scenario) bool { return s.ID == *child })
		if i < 0 {
			return fmt.Errorf("no scenario %q", *child)
		}
		r, err := measure(chosen[i], *trials, *warmup, *seed)
		if err == nil {
			err = json.NewEncoder(os.Stdout).Encode(r)
		}
		return err
	}
	if len(chosen) == 0 {
		return fmt.Errorf("no benchmark scenario matches %q", *glob)
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	var results []json.RawMessage
	medians := map[string][2]float64{}
	for i, s := range chosen {
		fmt.Fprintf(os.Stderr, "[%d/%d] %s\n", i+1, len(chosen), s.ID)
		cmd := exec.Command(exe, "bench", "--child", s.ID, "--trials", fmt.Sprint(*trials),
			"--warmup", fmt.Sprint(*warmup), "--seed", fmt.Sprint(*seed))
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("scenario %s: %w", s.ID, err)
		}
		var r struct {
			Median     float64 `json:"median_ns"`
			Throughput float64 `json:"throughput_tokens_per_sec"`
			GC         struct {
				Count float64 `json:"gc_pause_count"`
			} `json:"gc"`
		}
		if err := json.Unmarshal(out, &r); err != nil {
			return fmt.Errorf("scenario %s: %w", s.ID, err)
		}
		medians[s.ID] = [2]float64{r.Median, r.Throughput}
		results = append(results, bytes.TrimSpace(out))
		fmt.Printf("%-20s %12.0f ns  %12.0f tok/s  %4.0f GCs\n", s.ID, r.Median, r.Throughput, r.GC.Count)
	}
	ratio := func(a, b string, k int) any {
		x, okA := medians[a]
		y, okB := medians[b]
		if !okA || !okB {
			return nil
		}
		return x[k] / y[k]
	}
	report := map[string]any{
		"metadata":       metadata(*trials, *warmup, *seed),
		"static_metrics": staticMetrics(),
		"scenarios":      results,
		"derived": map[string]any{
			"speedup_forward_t2": ratio("parallel_T2", "parallel_T1", 1), "speedup_forward_t4": ratio("parallel_T4", "parallel_T1", 1),
			"speedup_train_t2": ratio("parallel_train_T2", "parallel_train_T1", 1), "speedup_train_t4": ratio("parallel_train_T4", "parallel_train_T1", 1),
			"cold_warm_ratio": ratio("dispatch_cold", "dispatch_warm", 0), "train_forward_ratio": ratio("mem_train_step", "dispatch_warm", 0),
		},
	}
	if *jsonPath == "" {
		return nil
	}
	text, err := json.MarshalIndent(report, "", "  ")
	if err == nil {
		err = os.WriteFile(*jsonPath, append(text, '\n'), 0o644)
	}
	if err == nil {
		fmt.Println("wrote", *jsonPath)
	}
	return err
}

// metadata describes the machine and the run.
func metadata(trials, warmup int, seed uint64) map[string]any {
	field := func(file, prefix string) string {
		text, _ := os.ReadFile(file)
		for _, line := range strings.Split(string(text), "\n") {
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				return strings.Trim(strings.TrimSpace(strings.TrimLeft(rest, " \t:=")), `"`)
			}
		}
		return "unknown"
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return map[string]any{
		"language": "go", "language_version": runtime.Version(),
		"os":        field("/etc/os-release", "PRETTY_NAME") + ", Linux " + strings.TrimSpace(string(kernel)),
		"cpu_model": field("/proc/cpuinfo", "model name"), "threads": runtime.NumCPU(),
		"timestamp": time.Now().UTC().Format(time.RFC3339), "n_trials": trials, "n_warmup": warmup, "seed": seed,
		"scalar_fma_peak_gflops": scalarPeak(), "intra_op_threads": 1, "blas": moe.BLAS,
		"command": "tracks/go/run " + strings.Join(os.Args[1:], " "),
	}
}
