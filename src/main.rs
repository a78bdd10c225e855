//! The factpatch command line: a thin layer over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use factpatch::model::{self, Model, Sampling};
use factpatch::tokenize::Tokenizer;
use std::path::PathBuf;

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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightDtype {
    F32,
    Bf16,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Typed errors already quote their cause: print each cause only when it adds something.
            let mut message = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !message.contains(&cause) {
                    message += if message.is_empty() { "" } else { ": " };
                    message += &cause;
                }
            }
            eprintln!("error: {message}");
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
        Command::Generate { model, prompt, max_new_tokens, top_k, temperature, seed } => {
            let sampling = match top_k {
                Some(k) => Sampling::TopK { k, temperature, seed },
                None => Sampling::Greedy,
            };
            let tok = Tokenizer::open(&model)?;
            let m = Model::load(&model)?;
            let ids = tok.ids(&prompt)?;
            let out = model::generate(&m, &[ids], max_new_tokens, sampling, &m.config.eos_token_ids)?;
            println!("{prompt}{}", tok.decode(&out[0])?);
            Ok(())
        }
    }
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let cfg = model::Config::read(dir)?;
    let ckpt = factpatch::checkpoint::Checkpoint::open(dir)?;
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
            "dtypes": dtypes, "files": files, "editable": editable,
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
    println!("positions  {}", cfg.rope_theta.map_or("learned".into(), |t| format!("rotary, theta {t}")));
    println!("unembed    {}", if cfg.tied_embeddings { "tied to the embedding" } else { "separate" });
    println!("edit view  out = W·k, W [{}, {}]; stored {:?}", cfg.hidden_size, cfg.intermediate_size, f.mlp_out.orientation);
    println!("editable   {} .. {} (default edit layers {:?})", editable[0], editable[editable.len() - 1], f.default_edit_layers);
    let _ = ckpt.tensor(&editable[0]).with_context(|| format!("{}: editable tensor missing", dir.display()))?;
    Ok(())
}
