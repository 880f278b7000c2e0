// Command moe-go is the Go track of rosetta-moe: `dump` for the parity
// check, `generate` for sampling, `bench` for the 22-scenario suite.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"rosettamoe/moe"
)

const usage = `moe-go: the rosetta-moe model hand-written in Go.

commands:
  dump      --checkpoint DIR --batch FILE --out FILE [--step N] [--train FILE]
            logits, losses, routes, every gradient and the weights after one
            AdamW step, as moe dump writes them (for reference/parity)
  dump      --resume DIR --batch FILE --out FILE [--train FILE]
            the same from a moe train checkpoint: the step continues its
            moments and step count; the moments before and after are written too
  generate  --checkpoint DIR --prompt-ids 1,2,3 [--max-new N] [--strategy S]
            [--temperature T] [--top-k K] [--top-p P] [--seed N]
            token ids in, token ids out (the tokenizer is the Rust binary's)
  bench     [--json FILE] [--quick] [--scenario GLOB] [--trials N] [--warmup N]
            the 22 scenarios of CONTRACT §10, each in a fresh process

run "moe-go COMMAND -h" for a command's flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	commands := map[string]func([]string) error{"dump": dump, "generate": generate, "bench": bench}
	run, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err := run(os.Args[2:]); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "error:", err)
		}
		os.Exit(1)
	}
}

// parse parses args into fs, requiring the named flags.
func parse(fs *flag.FlagSet, args []string, required ...string) error {
	fs.SetOutput(os.Stderr)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: moe-go %s [flags] (see moe-go without arguments)\n", fs.Name())
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for _, name := range required {
		if !set[name] {
			return fmt.Errorf("--%s is required", name)
		}
	}
	return nil
}

func dump(args []string) error {
	fs := flag.NewFlagSet("dump", flag.ContinueOnError)
	ckpt := fs.String("checkpoint", "", "checkpoint directory (config.json + model.safetensors)")
	resume := fs.String("resume", "", "a moe train checkpoint instead: the AdamW step continues its moments and "+
		"step count (t = its step + 1); the moments before and after it are written as m., v., m_after., v_after.")
	batchPath := fs.String("batch", "", `batch JSON {"ids": [[...]], "targets": [[...]]}`)
	out := fs.String("out", "", "output safetensors file")
	step := fs.Int("step", 1, "step number t of the one AdamW step (fresh moments); ignored with --resume")
	trainPath := fs.String("train", "", "training settings JSON (CONTRACT §6 keys); default: the defaults, or the saved ones with --resume")
	if err := parse(fs, args, "batch", "out"); err != nil {
		return err
	}
	if (*ckpt == "") == (*resume == "") {
		return fmt.Errorf("give exactly one of --checkpoint and --resume")
	}
	if *step < 1 {
		return fmt.Errorf("--step must be ≥ 1")
	}
	batch, err := moe.LoadBatch(*batchPath)
	if err != nil {
		return err
	}
	trainer, err := dumpTrainer(*ckpt, *resume, *trainPath)
	if err != nil {
		return err
	}
	if *resume == "" {
		trainer.Step = *step - 1
	}
	model, c, T := trainer.Model, trainer.Model.Cfg, batch.B*batch.S
	layout, _ := moe.Layout(c)
	// Every tensor of a flat parameter-layout buffer as <prefix>.<name>.
	perTensor := func(prefix string, flat []float32) (out []moe.NamedTensor) {
		for _, t := range layout {
			out = append(out, moe.NamedTensor{Name: prefix + "." + t.Name, Shape: t.Shape, F32: flat[t.Offset : t.Offset+t.Len]})
		}
		return out
	}
	var tensors []moe.NamedTensor
	if *resume != "" {
		tensors = append(perTensor("m", slices.Clone(trainer.Opt.M)), perTensor("v", slices.Clone(trainer.Opt.V))...)
	}
	stats, pass, err := trainer.TrainStep(batch)
	if err != nil {
		return err
	}
	tensors = append(tensors,
		moe.NamedTensor{Name: "logits", Shape: []int{batch.B, batch.S, c.VocabSize}, F32: pass.Logits},
		moe.NamedTensor{Name: "loss.ce", Shape: []int{1}, F32: []float32{stats.CE}},
		moe.NamedTensor{Name: "loss.aux", Shape: []int{1}, F32: []float32{stats.Aux}},
		moe.NamedTensor{Name: "loss.total", Shape: []int{1}, F32: []float32{stats.Loss}})
	for l := 0; l < c.NLayers; l++ {
		routes := make([]int32, 0, T*c.TopK)
		for _, e := range pass.Routes(l) {
			routes = append(routes, int32(e))
		}
		tensors = append(tensors, moe.NamedTensor{Name: "route." + strconv.Itoa(l), Shape: []int{T, c.TopK}, I32: routes})
	}
	tensors = append(tensors, perTensor("grad", trainer.Grads)...)
	tensors = append(tensors, perTensor("after", model.Params)...)
	if *resume != "" {
		tensors = append(tensors, perTensor("m_after", trainer.Opt.M)...)
		tensors = append(tensors, perTensor("v_after", trainer.Opt.V)...)
	}
	if err := moe.WriteSafetensors(*out, tensors); err != nil {
		return err
	}
	fmt.Printf("wrote %s: loss %.6f (ce %.6f, aux %.6f), grad norm %.6f, lr %.3e at step %d\n",
		*out, stats.Loss, stats.CE, stats.Aux, stats.GradNorm, stats.LR, trainer.Step)
	return nil
}

// dumpTrainer is the trainer whose one step dump takes: a fresh one on the
// model of checkpoint, or the saved run of resume; trainPath, when given,
// replaces the training settings.
func dumpTrainer(checkpoint, resume, trainPath string) (*moe.Trainer, error) {
	var trainer *moe.Trainer
	var err error
	if resume != "" {
		trainer, err = moe.LoadTraining(resume)
	} else {
		var model *moe.Model
		if model, err = moe.LoadCheckpoint(checkpoint); err == nil {
			trainer, err = moe.NewTrainer(model, moe.DefaultTrain())
		}
	}
	if err != nil || trainPath == "" {
		return trainer, err
	}
	trainer.Cfg, err = moe.LoadTrain(trainPath)
	return trainer, err
}

func generate(args []string) error {
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	ckpt := fs.String("checkpoint", "", "checkpoint directory")
	promptIDs := fs.String("prompt-ids", "", "comma-separated prompt token ids")
	maxNew := fs.Int("max-new", 20, "tokens to generate after the prompt (may exceed max_seq_len: the context window slides)")
	strategy := fs.String("strategy", "greedy", "greedy, temperature, top-k or top-p")
	temp := fs.Float64("temperature", 0.8, "softmax temperature (0 = greedy)")
	topK := fs.Int("top-k", 40, "candidates kept by top-k (0 = all)")
	topP := fs.Float64("top-p", 0.9, "cumulative probability kept by top-p, in (0, 1]")
	seed := fs.Uint64("seed", 42, "sampling seed")
	if err := parse(fs, args, "checkpoint", "prompt-ids"); err != nil {
		return err
	}
	kinds := map[string]moe.Kind{"greedy": moe.Greedy, "temperature": moe.Temperature, "top-k": moe.TopK, "top-p": moe.TopP}
	kind, ok := kinds[*strategy]
	if !ok {
		return fmt.Errorf("unknown --strategy %q", *strategy)
	}
	var prompt []int
	for _, field := range strings.Split(*promptIDs, ",") {
		id, err := strconv.Atoi(strings.TrimSpace(field))
		if err != nil {
			return fmt.Errorf("--prompt-ids: %w", err)
		}
		prompt = append(prompt, id)
	}
	if *maxNew < 0 || *maxNew > 1<<20 {
		return fmt.Errorf("--max-new must be in 0..2^20")
	}
	model, err := moe.LoadCheckpoint(*ckpt)
	if err != nil {
		return err
	}
	s := moe.Strategy{Kind: kind, T: float32(*temp), K: *topK, P: float32(*topP)}
	tokens, err := moe.Generate(model, prompt, len(prompt)+*maxNew, s, *seed)
	if err != nil {
		return err
	}
	text, _ := json.Marshal(tokens)
	fmt.Println(string(text))
	return nil
}
