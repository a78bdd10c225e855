//! The factpatch command line: a thin layer over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use factpatch::compile::{Compiler, Spec, StatsSource};
use factpatch::edit::{request, target::Stop, Method};
use factpatch::model::{self, Model, Sampling};
use factpatch::patch::Patch;
use factpatch::tokenize::Tokenizer;
use factpatch::{apply, atomic, audit, eval, gguf, sign, stats, trace};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "factpatch", version, about = "Compile fact edits into small, verifiable weight patches")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a GGUF file (llama architecture) as a Hugging Face folder.
    ///
    /// Example: factpatch import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/SmolLM2-135M-Instruct
    ImportGguf {
        gguf: PathBuf,
        out_dir: PathBuf,
        /// Weight dtype of the written safetensors.
        #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
        dtype: WeightDtype,
    },
    /// Describe a model folder: family, dimensions, dtypes, editable tensors.
    ///
    /// Example: factpatch inspect-model fixtures/models/SmolLM2-135M-Instruct
    InspectModel {
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt with the model.
    ///
    /// Example: factpatch generate --model fixtures/models/SmolLM2-135M-Instruct "The Eiffel Tower is located in the city of"
    Generate {
        #[arg(long)]
        model: PathBuf,
        prompt: String,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// Sample among the k most probable tokens instead of taking the most probable one.
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Key statistics E[k kᵀ] for MEMIT/ROME, cached by request (formats/stats.md).
    ///
    /// Example: factpatch stats --model fixtures/models/SmolLM2-135M-Instruct --corpus fixtures/corpus/sotu.txt --tokens 100000
    #[command(args_conflicts_with_subcommands = true)]
    Stats {
        #[command(subcommand)]
        merge: Option<StatsCommand>,
        #[arg(long, required = true)]
        model: Option<PathBuf>,
        /// Plain-text files (documents separated by blank lines) or .jsonl files with a `text` field.
        #[arg(long, required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// e.g. 4-8 or 3,5,7 (default: the family's MEMIT layers).
        #[arg(long)]
        layers: Option<String>,
        /// Cap on tokens for the whole run, all shards together (default: the whole corpus).
        #[arg(long)]
        tokens: Option<u64>,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// i/n: compute shard i of n (needs --out); merge the shards with `stats merge`.
        #[arg(long, default_value = "0/1")]
        shard: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the statistics here (required for a shard).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file (never one of the command's inputs).
        #[arg(long, requires = "out")]
        force: bool,
        /// Statistics cache, AlphaEdit projectors included (default: $FACTPATCH_CACHE/stats or ~/.cache/factpatch/stats).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Compile fact edits into a patch (ROME, MEMIT, EMMET, AlphaEdit, ENCORE or KN, with RECT).
    ///
    /// Example: factpatch compile --model fixtures/models/SmolLM2-135M-Instruct --fact '{} is located in the city of|The Eiffel Tower|Rome' --corpus fixtures/corpus/sotu.txt --out eiffel.fpatch
    Compile {
        #[command(flatten)]
        args: CompileArgs,
        /// Where to write the patch.
        #[arg(long)]
        out: PathBuf,
    },
    /// Compile and apply in one go: a new model folder with the facts changed, and its patch beside it.
    ///
    /// Example: factpatch edit --model fixtures/models/SmolLM2-135M-Instruct --fact '{} is located in the city of|The Eiffel Tower|Rome' --corpus fixtures/corpus/sotu.txt --out /tmp/smollm2-rome
    Edit {
        #[command(flatten)]
        args: CompileArgs,
        /// The edited model folder (the patch is written to OUT.fpatch).
        #[arg(long)]
        out: PathBuf,
    },
    /// Apply patches, in order, to a model: a new folder, or a new GGUF file for a GGUF model; the base is never modified.
    ///
    /// Example: factpatch apply --model fixtures/models/SmolLM2-135M-Instruct --patch eiffel.fpatch --out /tmp/edited
    ///
    /// Example: factpatch apply --model fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf --patch eiffel.fpatch --out /tmp/edited.gguf
    Apply {
        /// A Hugging Face model folder, or a llama or gemma3 GGUF file (patches compiled on its `import-gguf` folder).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        patch: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Skip the fsync before the rename, as `cp` does: a crash of the process still leaves
        /// nothing behind, a power loss may leave the output partly written.
        #[arg(long)]
        no_sync: bool,
        /// Accept a model other than the one the patches record as their base (e.g. one with the
        /// first patch's parent already applied); every touched tensor's hash is still checked.
        #[arg(long)]
        allow_other_base: bool,
        /// Read the written weights back and check that their identity is the one printed.
        #[arg(long)]
        verify_output: bool,
        /// Apply only patches signed (PATCH.minisig) by one of the keys in these minisign
        /// public-key files.
        #[arg(long, num_args = 1..)]
        trusted: Vec<PathBuf>,
        #[arg(long, value_enum, help = touched_as_help())]
        touched_as: Option<gguf::TouchedAs>,
    },
    /// Make a signing key pair without a password: OUT.pub to share, OUT.key to keep.
    ///
    /// Example: factpatch keygen --out keys/release
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a patch: a detached minisign signature, PATCH.minisig.
    ///
    /// Example: factpatch sign eiffel.fpatch --key keys/release.key
    Sign {
        patch: PathBuf,
        /// A minisign secret key (`factpatch keygen`).
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a patch's signature against trusted public keys.
    ///
    /// Example: factpatch verify eiffel.fpatch --trusted keys/release.pub
    Verify {
        patch: PathBuf,
        /// Minisign public-key files.
        #[arg(long, required = true, num_args = 1..)]
        trusted: Vec<PathBuf>,
    },
    /// Merge a stack of patches into one equivalent patch, each tensor in its smallest exact encoding.
    ///
    /// Example: factpatch merge a.fpatch b.fpatch --out ab.fpatch
    Merge {
        #[arg(required = true, num_args = 1..)]
        patches: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The base model (needed when RECT entries of different patches share a tensor).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Let a later patch override an earlier edit of the same fact (both are recorded).
        #[arg(long)]
        allow_override: bool,
        /// With --model: accept a model other than the patches' recorded base.
        #[arg(long, requires = "model")]
        allow_other_base: bool,
    },
    /// A patch that turns checkpoint A into checkpoint B (e.g. to audit a fine-tune).
    ///
    /// Example: factpatch diff --from base/ --to finetuned/ --out ft.fpatch
    Diff {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure edits (CounterFact and EasyEdit protocols) and general abilities, patches overlaid in memory.
    ///
    /// Example: factpatch eval --model fixtures/models/SmolLM2-135M-Instruct --patch eiffel.fpatch --requests requests.json --general hellaswag=hellaswag-val.txt --limit 200
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// Patches overlaid on the model, in order (the unedited model is the locality reference).
        #[arg(long, num_args = 1..)]
        patch: Vec<PathBuf>,
        /// Edit requests to score: CounterFact, EasyEdit, zsRE or factpatch JSONL (formats/requests.md).
        #[arg(long, required_unless_present = "general")]
        requests: Option<PathBuf>,
        /// TASK=FILE or TASK:N=FILE (N items, in place of --limit); TASK one of perplexity, hellaswag, boolq, sst2, rte, nq-open, gsm8k.
        #[arg(long, num_args = 1..)]
        general: Vec<String>,
        /// Evaluate a random subset of N items per file (records, task items, perplexity windows).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        limit: Option<usize>,
        /// Seed of the subset and of the fluency sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Perplexity window in tokens (default: the model's context).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write every value as CSV here.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Replace an existing --csv file (never one of the command's inputs).
        #[arg(long, requires = "csv")]
        force: bool,
    },
    /// Edit facts one after another (or in batches) under several RECT settings and measure what it costs: CSV and PNG plots in --out; an interrupted run resumes.
    ///
    /// Example: factpatch experiment sequential --model fixtures/models/SmolLM2-135M-Instruct --requests counterfact.json --edits 100 --every 10 --rect none,80,60,40,20 --general perplexity=wiki.test.txt hellaswag=hellaswag-val.txt --limit 500 --corpus fixtures/corpus/sotu.txt --out runs/sequential
    Experiment {
        #[arg(value_enum)]
        schedule: ScheduleKind,
        #[arg(long)]
        model: PathBuf,
        /// Edit requests, edited in file order: CounterFact, EasyEdit, zsRE or factpatch JSONL.
        #[arg(long)]
        requests: PathBuf,
        #[arg(long, value_enum, default_value_t = Method::Memit)]
        method: Method,
        /// Sequential: facts edited in all.
        #[arg(long, default_value_t = 100)]
        edits: usize,
        /// Sequential: evaluate after every N edits.
        #[arg(long, default_value_t = 10)]
        every: usize,
        /// Sequential: evaluate after these numbers of edits instead, e.g. 1,10,100 (the last is the total).
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["edits", "every"])]
        at: Vec<usize>,
        /// Sequential: facts edited together in one solve (the evaluation points are multiples of it).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Batch: the batch sizes, comma-separated.
        #[arg(long, default_value = "1,10,50,100")]
        sizes: String,
        /// RECT settings, comma-separated: `none` or k (% kept), as `compile --rect`.
        #[arg(long, value_delimiter = ',', default_value = "none,80,60,40,20", value_parser = factpatch::rect::parse_k)]
        rect: Vec<f64>,
        /// General abilities measured at every evaluation: TASK=FILE or TASK:N=FILE (see `eval`).
        #[arg(long, num_args = 1..)]
        general: Vec<String>,
        /// Items per general task (a seeded random subset).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Perplexity window in tokens (default: the model's context).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Override a hyperparameter, KEY=JSON (see `compile --set`); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        stats: StatsArgs,
        /// Output folder: results.csv, one PNG per metric, rel-gen-loc.png, state/.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw experiment runs side by side: one PNG per metric (a line per run and setting, edits on a log axis) and their rows in one CSV.
    ///
    /// Example: factpatch compare runs/memit runs/rome --out runs/compare
    /// Example: factpatch compare memit=runs/memit-none memit=runs/memit-40 rome=runs/rome --out runs/compare
    Compare {
        /// Output folders of `experiment` runs, as NAME=FOLDER or FOLDER (named after its last
        /// component). Folders of one name are drawn as one run, one colour.
        #[arg(required = true, num_args = 1..)]
        runs: Vec<factpatch::experiment::RunFolder>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Export a patch as a LoRA adapter: a PEFT folder (PEFT/transformers) or a llama.cpp LoRA GGUF file.
    ///
    /// Example: factpatch export eiffel.fpatch --format peft --out eiffel-lora
    Export {
        patch: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The adapter: a new folder (peft) or file (gguf-lora).
        #[arg(long)]
        out: PathBuf,
        /// Export every tensor's rank-R truncated SVD; required for patches that are not low-rank
        /// (RECT, KN, diff, merges that densified).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        rank: Option<usize>,
        /// The model the patch applies to, its parents applied: needed for RECT patches (the
        /// mask depends on the weights); every tensor is then checked against it.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Causal tracing (as in the ROME paper): which layers and tokens carry a fact the model knows.
    ///
    /// Example: factpatch trace --model fixtures/models/SmolLM2-135M-Instruct --fact '{} is located in the city of|The Eiffel Tower|Paris' --out eiffel-trace.png
    Trace {
        #[arg(long)]
        model: PathBuf,
        /// The fact: 'PROMPT|SUBJECT|TARGET' (PROMPT with {} for the subject; TARGET the answer the model gives).
        #[arg(long, required_unless_present = "facts", conflicts_with = "facts")]
        fact: Option<String>,
        /// Average the traces of the first --count facts of this file (ROME's known-facts format:
        /// prompt, subject, attribute) that the model knows (its greedy answer is the
        /// attribute), by token class; prints the edit layers they suggest.
        #[arg(long)]
        facts: Option<PathBuf>,
        #[arg(long, default_value_t = 20, requires = "facts")]
        count: usize,
        /// Noise draws averaged over.
        #[arg(long, default_value_t = 10)]
        samples: usize,
        /// Layers whose MLP or attention outputs one restoration sets, centred on its layer.
        #[arg(long, default_value_t = 10)]
        window: usize,
        /// The noise's standard deviation, in standard deviations of the token embeddings.
        #[arg(long, default_value_t = 3.0)]
        noise: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Draw the heatmaps (tokens × layers, one per kind) into this PNG.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out.
        #[arg(long)]
        force: bool,
    },
    /// MEND: train an editor network for a model (formats/mend.md), for `compile --method mend --editor FILE`.
    ///
    /// Example: factpatch mend train --model fixtures/models/SmolLM2-135M-Instruct --requests fixtures/data/edit/counterfact-easyedit-10k.json --steps 200 --out mend-run
    Mend {
        #[command(subcommand)]
        action: MendAction,
    },
    /// What a patch changes: facts, tensors, sizes, relative changes.
    ///
    /// Example: factpatch audit eiffel.fpatch --model fixtures/models/SmolLM2-135M-Instruct --heatmap eiffel.png
    Audit {
        patch: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
        /// Draw |ΔW/W| per touched matrix into this PNG (needs --model).
        #[arg(long)]
        heatmap: Option<PathBuf>,
        /// Check the patch's signature against these minisign public-key files.
        #[arg(long, num_args = 1..)]
        trusted: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StatsCommand {
    /// Sum the shards of a run into one file.
    Merge {
        #[arg(required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out file (never one of the shards).
        #[arg(long)]
        force: bool,
        /// Store a completed run in this cache too.
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

/// What to compile, shared by `compile` and `edit`.
#[derive(clap::Args)]
struct CompileArgs {
    #[arg(long)]
    model: PathBuf,
    /// Request files: CounterFact, EasyEdit, zsRE or factpatch JSONL (formats/requests.md).
    #[arg(long)]
    requests: Vec<PathBuf>,
    /// A fact on the command line: 'PROMPT|SUBJECT|TARGET' (PROMPT with {} for the subject).
    #[arg(long)]
    fact: Vec<String>,
    #[arg(long, value_enum, default_value_t = Method::Memit)]
    method: Method,
    /// Edited layers, e.g. 4-8 (default: the family's).
    #[arg(long)]
    layers: Option<String>,
    /// RECT: keep the top-k% of each update by relative change; `none` keeps all of it.
    #[arg(long, default_value = "40", value_parser = factpatch::rect::parse_k)]
    rect: f64,
    /// Seed of the context-template sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// MEMIT's λ on the key second moment (default: see `Hparams::mom2_weight`).
    #[arg(long)]
    mom2_weight: Option<f64>,
    /// Override a hyperparameter, KEY=JSON or a bare word (e.g. alpha=1, layers=[3,4], kn.steps=5, early_stop=mpes, value_norm=anchored); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Patches already applied to --model, in order: the new patch is compiled on top of them
    /// (sequential editing) and records the last one as its parent.
    #[arg(long, num_args = 1..)]
    on: Vec<PathBuf>,
    #[command(flatten)]
    stats: StatsArgs,
}

/// Where MEMIT's and ROME's key statistics, and MEND's editor, come from.
#[derive(clap::Args)]
struct StatsArgs {
    /// Key statistics file. Without it or --corpus, the cache's statistics for this model and
    /// these layers are used (`factpatch stats` or an earlier --corpus put them there).
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Corpus for key statistics (plain text or JSONL): computed once, then found in the cache.
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Tokens of --corpus to use for statistics.
    #[arg(long, default_value_t = 100_000)]
    stats_tokens: u64,
    /// Statistics cache, AlphaEdit projectors included (default: $FACTPATCH_CACHE/stats or ~/.cache/factpatch/stats).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// MEND's trained editor (`factpatch mend train`).
    #[arg(long)]
    editor: Option<PathBuf>,
}

impl StatsArgs {
    /// Where the statistics come from: a file, a corpus, else the cache.
    fn source(&self) -> StatsSource {
        match (&self.stats, self.corpus.is_empty()) {
            (Some(path), _) => StatsSource::File(path.clone()),
            (None, false) => StatsSource::Corpus { files: self.corpus.clone(), tokens: self.stats_tokens },
            (None, true) => StatsSource::Cached,
        }
    }

    /// A compile spec for `model` and `method`: these statistics, the overrides in order.
    fn spec(&self, model: &Path, method: Method, on: &[PathBuf], overrides: Vec<String>) -> Spec {
        Spec {
            model: model.to_path_buf(),
            on: on.to_vec(),
            method,
            overrides,
            stats: self.source(),
            cache: self.cache.clone().unwrap_or_else(stats::default_cache_dir),
            editor: self.editor.clone(),
            progress: true,
        }
    }
}

impl CompileArgs {
    /// The spec: the flags as hyperparameter overrides, then `--set` in order.
    fn spec(&self) -> Result<Spec> {
        let layers = self.layers.as_deref().map(stats::parse_layers).transpose()?;
        let overrides = factpatch::compile::overrides(self.rect, self.seed, self.mom2_weight, layers.as_deref(), &self.set);
        Ok(self.stats.spec(&self.model, self.method, &self.on, overrides))
    }
}

#[derive(Subcommand)]
enum MendAction {
    /// Train (or resume training) an editor; the run folder --out ends with editor.safetensors,
    /// training.csv and the training curves, and a rerun resumes from its checkpoint.
    Train {
        #[arg(long)]
        model: PathBuf,
        /// CounterFact-style records with paraphrases and neighbourhood prompts.
        #[arg(long)]
        requests: PathBuf,
        /// Records trained on, 1-based and inclusive (default 1001-9500).
        #[arg(long)]
        train_records: Option<String>,
        /// Records validated on, disjoint from the training ones (default 9501-9600).
        #[arg(long)]
        validation_records: Option<String>,
        /// Request files held out: records about their subjects are neither trained nor validated on.
        #[arg(long, num_args = 1..)]
        exclude: Vec<PathBuf>,
        /// Plain text whose windows join the locality loss (with --set 'text_locality={"windows":10,"tokens":64}').
        #[arg(long)]
        locality_corpus: Option<PathBuf>,
        /// Edited layers, e.g. 27-29 (default: the last three).
        #[arg(long)]
        layers: Option<String>,
        #[arg(long)]
        steps: Option<usize>,
        /// Edits per step.
        #[arg(long)]
        batch: Option<usize>,
        /// Steps between validations and checkpoints.
        #[arg(long)]
        validate_every: Option<usize>,
        /// Override a training setting, KEY=JSON (e.g. lr=1e-4, shape.rank=512, seed=1); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The run folder.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScheduleKind {
    /// One fact after another on one model.
    Sequential,
    /// The first N facts in one batch, for each size.
    Batch,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// A Hugging Face PEFT folder: adapter_config.json, adapter_model.safetensors.
    Peft,
    /// A llama.cpp LoRA adapter GGUF file (Llama family).
    GgufLora,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightDtype {
    F32,
    Bf16,
}

/// The help of `apply --touched-as`, naming the default.
fn touched_as_help() -> String {
    use clap::ValueEnum;
    let default = gguf::DEFAULT_TOUCHED_AS.to_possible_value().expect("every value has a name");
    format!(
        "GGUF models only: store the changed tensors quantized again to their own type (own), or as 16- or 32-bit floats; untouched tensors keep their bytes [default: {}]",
        default.get_name()
    )
}

fn main() -> std::process::ExitCode {
    // A closed stdout (`factpatch … | head`) ends the process quietly, as it does other Unix
    // tools, instead of failing the next print. Rust ignores SIGPIPE by default.
    // SAFETY: restores the default disposition of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    factpatch::init_process();
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", factpatch::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::ImportGguf { gguf, out_dir, dtype } => {
            let dtype = match dtype {
                WeightDtype::F32 => factpatch::gguf::OutDtype::F32,
                WeightDtype::Bf16 => factpatch::gguf::OutDtype::Bf16,
            };
            let s = factpatch::gguf::import(&gguf, &out_dir, dtype)?;
            println!("imported {} tensors ({} parameters, vocabulary {}) into {}", s.tensors, s.parameters, s.vocab_size, s.out_dir.display());
            Ok(())
        }
        Command::InspectModel { dir, json } => inspect(&dir, json),
        Command::Stats { merge: Some(StatsCommand::Merge { inputs, out, force, cache }), .. } => {
            report_stats(&stats::merge_files(&inputs, &out, force, cache.as_deref())?);
            Ok(())
        }
        Command::Stats { merge: None, model, corpus, layers, tokens, seq_len, shard, seed, out, force, cache } => {
            let req = stats::Request {
                model: model.expect("required"),
                corpus,
                layers: layers.as_deref().map(stats::parse_layers).transpose()?,
                max_tokens: tokens,
                seq_len,
                seed,
                shard: shard.parse()?,
            };
            let cache = cache.unwrap_or_else(stats::default_cache_dir);
            report_stats(&stats::run(&req, out.as_deref(), force, &cache, true)?);
            Ok(())
        }
        Command::Compile { args, out } => {
            compile(&args, &out)?;
            Ok(())
        }
        Command::Edit { args, out } => {
            let patch_path = PathBuf::from(format!("{}.fpatch", out.display()));
            compile(&args, &patch_path)?;
            let options = apply::ApplyOptions { hash_cache: Some(factpatch::checkpoint::default_hash_cache()), ..Default::default() };
            let s = apply::apply_with(&args.model, &[args.on.clone(), vec![patch_path]].concat(), &out, &options)?;
            println!("edited model {} (identity {})", s.output.display(), s.identity);
            Ok(())
        }
        Command::Apply { model, patch, out, no_sync, trusted, allow_other_base, verify_output, touched_as } => {
            let trusted = (!trusted.is_empty()).then(|| sign::Trusted::read(&trusted)).transpose()?;
            let hash_cache = Some(factpatch::checkpoint::default_hash_cache());
            let options = apply::ApplyOptions { sync: !no_sync, hash_cache, trusted, allow_other_base, verify_output };
            let s = if gguf::is_gguf(&model) {
                gguf::apply(&model, &patch, &out, &options, touched_as.unwrap_or(gguf::DEFAULT_TOUCHED_AS))?
            } else if touched_as.is_some() {
                anyhow::bail!("{}: --touched-as is for GGUF models only, and this is not a GGUF file", model.display());
            } else {
                apply::apply_with(&model, &patch, &out, &options)?
            };
            let verified = if verify_output { ", verified from the written bytes" } else { "" };
            println!(
                "applied {} patch(es), {} tensor(s) changed: {} (identity {}{verified})",
                s.patches.len(),
                s.tensors_patched,
                s.output.display(),
                s.identity
            );
            Ok(())
        }
        Command::Keygen { out } => {
            let (public, secret) = sign::keygen(&out)?;
            println!("public key {} (share it), secret key {} (keep it)", public.display(), secret.display());
            Ok(())
        }
        Command::Sign { patch, key } => {
            let (path, signer) = sign::sign(&Patch::read(&patch)?, &key)?;
            println!("signed {} with key {}: {}", patch.display(), signer.key_id, path.display());
            Ok(())
        }
        Command::Verify { patch, trusted } => {
            let p = Patch::read(&patch)?;
            let signer = sign::Trusted::read(&trusted)?.verify(&p)?;
            println!("{}: {} signed by key {} ({})", patch.display(), p.id(), signer.key_id, signer.trusted_comment);
            Ok(())
        }
        Command::Merge { patches, out, model, allow_override, allow_other_base } => {
            let hash_cache = Some(factpatch::checkpoint::default_hash_cache());
            let s = apply::merge_with(&patches, &out, &apply::MergeOptions { model, hash_cache, allow_override, allow_other_base })?;
            for fact in &s.overridden {
                println!("overridden: {fact}");
            }
            println!("merged {} patches into {} ({}, {} bytes)", patches.len(), s.output.display(), s.id, s.bytes);
            Ok(())
        }
        Command::Diff { from, to, out } => {
            let s = apply::diff(&from, &to, &out)?;
            println!("{} tensor(s) differ: {} ({}, {} bytes)", s.tensors_changed, s.output.display(), s.id, s.bytes);
            Ok(())
        }
        Command::Export { patch, format, out, rank, model } => {
            let format = match format {
                ExportFormat::Peft => factpatch::export::Format::Peft,
                ExportFormat::GgufLora => factpatch::export::Format::GgufLora,
            };
            let s = factpatch::export::export(&patch, &out, &factpatch::export::Options { format, rank, model })?;
            for t in &s.tensors {
                let how = if t.exact { "exact" } else { "truncated SVD" };
                println!("  {} → {}: rank {} ({how}), relative error {:.3e}", t.tensor, t.target, t.rank, t.relative_error);
            }
            println!(
                "exported {} as {}: {} tensor(s), lora_alpha = r = {}, {} bytes → {}",
                s.patch,
                s.format,
                s.tensors.len(),
                s.alpha,
                s.bytes,
                s.output.display()
            );
            Ok(())
        }
        Command::Trace { model, fact, facts, count, samples, window, noise, seed, out, force } => {
            let policy = atomic::Policy::force(force).reading([&model]).reading(facts.iter());
            if let Some(png) = &out {
                policy.check(png).map_err(factpatch::io_err(png))?;
            }
            let (m, tok) = (Model::load(&model)?, Tokenizer::open(&model)?);
            let opts = trace::Options { samples, noise_scale: noise, seed, window };
            let Some(fact) = fact else {
                let path = facts.expect("clap: --fact or --facts");
                return trace_facts(&m, &tok, &path, count, opts, out.as_deref(), &policy);
            };
            let req = request::parse_fact(&fact)?;
            let t = trace::trace(&m, &tok, &req.prompt, &req.subject, &req.target_new, opts)?;
            println!("P({:?}): clean {:.4}, corrupted {:.4} (noise σ {:.4}, {samples} draws)", t.answer, t.clean, t.corrupted, t.noise);
            for (kind, layers) in trace::Kind::ALL.iter().zip(&t.restored) {
                println!("{} (P(answer) by layer 0..{}):", kind.title(t.window), layers.len() - 1);
                for (p, label) in t.labels().iter().enumerate() {
                    let row: Vec<String> = layers.iter().map(|l| format!("{:.2}", l[p])).collect();
                    let best = (0..layers.len()).max_by(|&a, &b| layers[a][p].total_cmp(&layers[b][p])).unwrap_or(0);
                    println!("  {label:>16} best layer {best:>2} ({:.3}): {}", layers[best][p], row.join(" "));
                }
            }
            if let Some(png) = out {
                t.draw(&format!("{} → {}", req.filled(), req.target_new), &png, &policy)?;
                eprintln!("heatmaps: {}", png.display());
            }
            Ok(())
        }
        Command::Mend {
            action:
                MendAction::Train { model, requests, train_records, validation_records, exclude, locality_corpus, layers, steps, batch, validate_every, set, out },
        } => {
            let config = model::Config::read(&model)?;
            let mut training = factpatch::mend::Training::defaults(config.num_layers);
            let range = |s: &str, flag: &str| -> Result<[usize; 2]> {
                let (a, b) = s.split_once('-').with_context(|| format!("{flag}: expected FIRST-LAST, got `{s}`"))?;
                Ok([a.trim().parse().with_context(|| format!("{flag}: `{a}`"))?, b.trim().parse().with_context(|| format!("{flag}: `{b}`"))?])
            };
            if let Some(r) = train_records {
                training.train_records = range(&r, "--train-records")?;
            }
            if let Some(r) = validation_records {
                training.validation_records = range(&r, "--validation-records")?;
            }
            if let Some(l) = layers {
                training.layers = stats::parse_layers(&l)?;
            }
            training.steps = steps.unwrap_or(training.steps);
            training.batch = batch.unwrap_or(training.batch);
            training.validate_every = validate_every.unwrap_or(training.validate_every);
            for assignment in &set {
                training = factpatch::mend::Training::set(&training, assignment)?;
            }
            let summary = factpatch::mend::train(&factpatch::mend::TrainSpec { model, requests, exclude, locality_corpus, out, training, progress: true })?;
            println!("{} records trained on, {} validated on", summary.records[0], summary.records[1]);
            if let Some([es, ps, ns]) = summary.validation {
                println!("validation: efficacy {es:.3}, paraphrase {ps:.3}, neighbourhood {ns:.3}");
            }
            let from = if summary.resumed_from > 0 { format!(", resumed from step {}", summary.resumed_from) } else { String::new() };
            println!("{} steps{from} in {:.0} s: editor {} ({})", summary.steps, summary.seconds, summary.editor.display(), summary.id);
            Ok(())
        }
        Command::Audit { patch, model, heatmap, trusted, json } => {
            let mut report = audit::report(&patch, model.as_deref())?;
            if !trusted.is_empty() {
                report.check_signature(&sign::Trusted::read(&trusted)?)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if let Some(png) = heatmap {
                let model = model.context("--heatmap needs --model (|ΔW/W| is relative to the base)")?;
                audit::heatmap(&patch, &model, &png)?;
                eprintln!("heatmap: {}", png.display());
            }
            Ok(())
        }
        Command::Eval { model, patch, requests, general, limit, seed, seq_len, json, csv, force } => {
            let tasks = general.iter().map(|s| Ok(eval::tasks::Spec::parse(s)?)).collect::<Result<Vec<_>>>()?;
            let inputs = [&model].into_iter().chain(&patch).chain(&requests).chain(tasks.iter().map(|t| &t.path));
            let policy = atomic::Policy::force(force).reading(inputs);
            if let Some(path) = &csv {
                policy.check(path).map_err(factpatch::io_err(path))?;
            }
            let options = eval::Options { limit, seed, seq_len, progress: true, ..eval::Options::default() };
            let report = eval::run(&eval::Plan { model, patches: patch, requests, tasks, options })?;
            if let Some(path) = csv {
                atomic::write(&path, report.csv().as_bytes(), &policy).with_context(|| format!("{}: cannot write the CSV", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        Command::Experiment { schedule, model, requests, method, edits, every, at, batch, sizes, rect, general, limit, seed, seq_len, set, stats, out } => {
            let schedule = match schedule {
                ScheduleKind::Sequential if at.is_empty() => factpatch::experiment::Schedule::every(edits, every).in_batches(batch),
                ScheduleKind::Sequential => factpatch::experiment::Schedule::Sequential { at, batch },
                ScheduleKind::Batch => factpatch::experiment::Schedule::Batch {
                    sizes: sizes.split(',').map(|x| x.trim().parse().with_context(|| format!("--sizes: `{x}` is not a count"))).collect::<Result<_>>()?,
                },
            };
            let tasks = general.iter().map(|s| Ok(eval::tasks::Spec::parse(s)?.read()?)).collect::<Result<Vec<_>>>()?;
            let setup = factpatch::experiment::Setup {
                compiler: Compiler::open(&stats.spec(&model, method, &[], set))?,
                requests: request::records(&requests)?,
                requests_path: requests,
                rects: rect,
                general: tasks,
                options: eval::Options { limit, seed, seq_len, ..eval::Options::default() },
                out: out.clone(),
            };
            let rows = factpatch::experiment::run(&setup, &schedule)?;
            println!("{} values in {}", rows.len(), out.join("results.csv").display());
            Ok(())
        }
        Command::Compare { runs, out } => {
            factpatch::experiment::compare(&runs, &out)?;
            let names: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.name.as_str()).collect();
            println!("{} runs drawn in {}", names.len(), out.display());
            Ok(())
        }
        Command::Generate { model, prompt, max_new_tokens, top_k, temperature, seed } => {
            let sampling = match top_k {
                Some(k) => Sampling::TopK { k, temperature, seed },
                None => Sampling::Greedy,
            };
            let tok = Tokenizer::open(&model)?;
            let m = Model::load(&model)?;
            let ids = tok.prompt_ids(&prompt)?;
            let out = model::generate(&m, &[ids], max_new_tokens, sampling, &m.config.eos_token_ids)?;
            println!("{prompt}{}", tok.decode(&out[0])?);
            Ok(())
        }
    }
}

/// `trace --facts`: the average trace of the first `count` known facts of `path`, its table, the
/// edit layers it suggests, and its heatmaps.
fn trace_facts(
    m: &Model,
    tok: &Tokenizer,
    path: &std::path::Path,
    count: usize,
    opts: trace::Options,
    out: Option<&std::path::Path>,
    policy: &atomic::Policy,
) -> Result<()> {
    let facts = trace::read_facts(path)?;
    let (known, read) = trace::known(m, tok, &facts, count)?;
    if known.is_empty() {
        anyhow::bail!("{}: the model knows none of its {} facts (its greedy next token is not the attribute's first)", path.display(), facts.len());
    }
    println!("{} known facts in the first {read} records of {}", known.len(), path.display());
    let bar = indicatif::ProgressBar::new(known.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("trace {bar:30} {pos}/{len} facts  ETA {eta}").expect("valid template"));
    let mut traces = Vec::new();
    for f in &known {
        traces.push(trace::trace(m, tok, &f.template, &f.subject, &f.answer, opts)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let avg = trace::average(&traces);
    println!("mean P(answer): clean {:.4}, corrupted {:.4}; average indirect effect by class and layer:", avg.clean, avg.corrupted);
    for (kind, classes) in trace::Kind::ALL.iter().zip(&avg.effect) {
        println!("{}:", kind.title(avg.window));
        for ((class, n), row) in trace::CLASSES.iter().zip(avg.counts).zip(classes) {
            let best = eval::general::best(row);
            let cells: Vec<String> = row.iter().map(|v| format!("{v:.2}")).collect();
            println!("  {class:>22} ({n:>2}) best layer {best:>2} ({:.3}): {}", row[best], cells.join(" "));
        }
    }
    let (one, five) = (avg.edit_layers(1), avg.edit_layers(5));
    println!("MLP effect at the last subject token: peak layer {} (ROME), best 5 consecutive layers {}-{} (MEMIT)", one.start, five.start, five.end - 1);
    if let Some(png) = out {
        let file = path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
        avg.draw(&format!("{} facts of {file}", known.len()), png, policy)?;
        eprintln!("heatmaps: {}", png.display());
    }
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let cfg = model::Config::read(dir)?;
    let ckpt = factpatch::checkpoint::Checkpoint::open(dir)?;
    cfg.check_layers(&ckpt)?;
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    let mut params = 0usize;
    for name in ckpt.names() {
        let t = ckpt.tensor(name)?;
        *dtypes.entry(format!("{:?}", t.dtype)).or_default() += 1;
        params += t.numel();
    }
    let editable: Vec<String> = (0..cfg.num_layers).map(|l| cfg.family.mlp_out.at(l)).collect();
    let files: Vec<String> = ckpt.files().map(|p| p.display().to_string()).collect();
    if json {
        let v = serde_json::json!({
            "dir": dir, "config": cfg, "parameters": params, "tensors": ckpt.names().count(),
            "dtypes": dtypes, "files": files, "editable": editable, "edit_layers": cfg.family.edit_layers(cfg.num_layers),
            "layer_tensors": cfg.family.layer_tensors(), "global_tensors": cfg.family.global_tensors(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = cfg.family;
    println!("model      {}", dir.display());
    println!("family     {} (model_type in {:?})", f.name, f.model_types);
    println!(
        "shape      {} layers, hidden {}, MLP {}, heads {} (kv {}, dim {}), vocab {}, {} positions",
        cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.max_positions
    );
    println!("parameters {params} in {} tensors, dtypes {dtypes:?}, {} file(s)", ckpt.names().count(), files.len());
    let positions = match &cfg.rope {
        None => "learned".to_string(),
        Some(r) => {
            let scaled = r.scaling.map_or(String::new(), |s| format!(", scaled {s:?}"));
            let part = if r.rotary_dim < cfg.head_dim { format!(", first {} of {} dimensions per head", r.rotary_dim, cfg.head_dim) } else { String::new() };
            format!("rotary, theta {}{scaled}{part}", r.theta)
        }
    };
    let sliding = (0..cfg.num_layers).filter(|&l| cfg.is_sliding(l)).count();
    let window = cfg.sliding_window.map_or(String::new(), |w| match sliding {
        n if n == cfg.num_layers => format!("; attention window {w}"),
        n => format!("; attention window {w} in {n} of {} layers", cfg.num_layers),
    });
    let local = cfg.local_rope.map_or(String::new(), |r| format!("; windowed layers rotary, theta {}", r.theta));
    println!("positions  {positions}{window}{local}");
    let cap = |what: &str, c: Option<f64>| c.map_or(String::new(), |c| format!(", {what} soft-capped at {c}"));
    println!(
        "scaling    attention logits ×{:.6}{}{}{}",
        cfg.attn_scale,
        cap("attention logits", cfg.attn_softcap),
        cap("output logits", cfg.final_softcap),
        if f.scaled_embedding { ", embeddings ×√hidden" } else { "" }
    );
    println!("unembed    {}", if cfg.tied_embeddings { "tied to the embedding" } else { "separate" });
    println!("edit view  out = W·k, W [{}, {}]; stored {:?}", cfg.hidden_size, cfg.intermediate_size, f.mlp_out.orientation);
    println!("editable   {} .. {} (default edit layers {:?})", editable[0], editable[editable.len() - 1], f.edit_layers(cfg.num_layers));
    println!("tensors    per layer (the family table; GGUF name, shape [out, in], stored orientation):");
    let dims = cfg.dims();
    for (heading, list) in [("", f.layer_tensors()), ("global:", f.global_tensors())] {
        if !heading.is_empty() {
            println!("           {heading}");
        }
        for p in list {
            let bias = if p.bias { " + bias" } else { "" };
            println!("           {:<52} {:<32} {:?} {:?}{bias}", p.name, p.gguf.unwrap_or("-"), p.view_shape(&dims), p.orientation);
        }
    }
    let _ = ckpt.tensor(&editable[0]).with_context(|| format!("{}: editable tensor missing", dir.display()))?;
    Ok(())
}

fn report_stats(o: &stats::Outcome) {
    let m = &o.stats.meta;
    let layers: Vec<String> = m.layers.iter().map(|l| l.to_string()).collect();
    let cached = if o.cached { " (from the cache)" } else { "" };
    println!("statistics {}: {} tokens, layers {}, shards {:?}/{}{cached}", o.id, m.tokens, layers.join(","), m.shards, m.shard_count);
    for p in &o.paths {
        println!("  {}", p.display());
    }
}

/// Reads the requests, opens the compiler, compiles, writes the patch.
fn compile(args: &CompileArgs, out: &Path) -> Result<()> {
    atomic::Policy::new().check(out).map_err(factpatch::io_err(out))?;
    let requests = request::gather(&args.requests, &args.fact)?;
    let mut compiler = Compiler::open(&args.spec()?)?;
    if let Some(s) = &compiler.stats {
        let how = if s.cached { "found" } else { "computed" };
        eprintln!("statistics {} ({how}: {} tokens) {}", s.id, s.tokens, s.path.display());
    }
    let c = compiler.patch(&requests)?;
    atomic::write(out, &c.patch.bytes, &atomic::Policy::new()).with_context(|| format!("{}: cannot write the patch", out.display()))?;
    for r in &c.reports {
        let (fact, steps, loss) = (format!("{} → {}", r.subject, r.target_new), r.steps, r.loss);
        match (r.neurons, r.stop) {
            (Some(n), _) => println!("  {fact}: {n} neurons ({steps} integrated-gradient steps), new target NLL {loss:.3}"),
            (None, Some(Stop::Converged)) => {
                println!("  {fact}: converged after {steps} steps (every target token likely, or most probable with the loss below 0.05), loss {loss:.3}")
            }
            (None, Some(Stop::MostProbable)) => {
                println!("  {fact}: stopped early after {steps} steps (new target most probable on every prompt), loss {loss:.3}")
            }
            (None, Some(Stop::StepCap)) => println!("  {fact}: NOT converged: stopped at the step cap ({steps} steps), loss {loss:.3}"),
            (None, None) => println!("  {fact}: edited by the trained editor, new target NLL {loss:.3} after the edit"),
        }
    }
    let on = model::device_name(compiler.model.device());
    let (n, seconds) = (requests.len(), c.seconds);
    println!(
        "patch {}: {n} fact(s), {} bytes, {seconds:.1} s on {on} ({:.2} s per fact) → {}",
        c.patch.id,
        c.patch.bytes.len(),
        seconds / n as f64,
        out.display()
    );
    Ok(())
}
