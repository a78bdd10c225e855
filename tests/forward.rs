//! The forward pass matches Hugging Face transformers (fixtures from `fixtures/reference.py`):
//! logits of tiny GPT-2 and Llama models (f32, bf16, sharded) and of the imported SmolLM2, alone
//! and in a right-padded batch, and of the imported Gemma 3 270M; captured keys and residuals; and
//! greedy generation of known facts by both.

mod common;

use candle_core::IndexOp;
use common::{gemma3_270m, ids, read_ref, root, smollm2, Ref};
use factpatch::model::{generate, Batch, Hooks, Model, Sampling};
use factpatch::tokenize::Tokenizer;
use std::collections::BTreeMap;

fn logits(model: &Model, batch: &Batch) -> Vec<Vec<Vec<f32>>> {
    let trace = model.forward(batch, &Hooks::default(), None).unwrap();
    model.logits(&trace.hidden).unwrap().to_vec3().unwrap()
}

#[test]
fn tiny_models_match_transformers() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-llama-bf16", "tiny-llama-sharded"] {
        let dir = root().join("fixtures").join(name);
        let model = Model::load(&dir).unwrap();
        let refs = read_ref(&dir.join("reference-logits.safetensors"));
        for seq in 0..3 {
            let input = ids(&refs[&format!("seq{seq}.input_ids")]);
            let expected = &refs[&format!("seq{seq}.logits")];
            let got = logits(&model, &Batch::right_padded(&[input]));
            let vocab = expected.shape[1];
            let mut worst = 0f64;
            for (t, row) in got[0].iter().enumerate() {
                let want = &expected.f[t * vocab..(t + 1) * vocab];
                worst = row.iter().zip(want).fold(worst, |m, (a, b)| m.max((*a as f64 - b).abs()));
                let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
                let row64: Vec<f64> = row.iter().map(|&x| x as f64).collect();
                assert_eq!(argmax(&row64), argmax(want), "{name} seq{seq} position {t}: argmax differs");
            }
            assert!(worst <= 1e-4, "{name} seq{seq}: max |Δlogit| = {worst:e}");
        }
    }
}

/// Checks one sequence's logits against the summary transformers stored for it.
fn check_summary(name: &str, got: &[Vec<f32>], refs: &std::collections::BTreeMap<String, common::Ref>, prefix: &str, row: usize, len: usize) {
    let sample = ids(&refs["sample_ids"]);
    let t_all = refs[&format!("{prefix}.argmax")].shape.last().copied().unwrap();
    let mut worst = 0f64;
    for (t, logits) in got.iter().enumerate().take(len) {
        let at = row * t_all + t;
        let argmax = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
        assert_eq!(argmax as i64, refs[&format!("{prefix}.argmax")].i[at], "{name} position {t}: argmax differs");
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        worst = worst.max((lse - refs[&format!("{prefix}.logsumexp")].f[at]).abs());
        let (top_ids, top_vals) = (&refs[&format!("{prefix}.top20_ids")], &refs[&format!("{prefix}.top20_values")]);
        for j in 0..20 {
            let id = top_ids.i[at * 20 + j] as usize;
            worst = worst.max((logits[id] as f64 - top_vals.f[at * 20 + j]).abs());
        }
        let samples = &refs[&format!("{prefix}.sample_logits")];
        for (j, &id) in sample.iter().enumerate() {
            worst = worst.max((logits[id as usize] as f64 - samples.f[at * sample.len() + j]).abs());
        }
    }
    assert!(worst <= 1e-3, "{name}: max |Δ| over logsumexp, top-20 and sampled logits = {worst:e}");
}

/// Every reference prompt `p{n}` alone (at least 8 of them) against its reference summary.
fn check_prompts(model: &Model, refs: &BTreeMap<String, Ref>) {
    let mut prompts = 0;
    for p in 0.. {
        let Some(input) = refs.get(&format!("p{p}.input_ids")) else { break };
        let input = ids(input);
        let got = logits(model, &Batch::right_padded(std::slice::from_ref(&input)));
        check_summary(&format!("prompt {p}"), &got[0], refs, &format!("p{p}"), 0, input.len());
        prompts += 1;
    }
    assert!(prompts >= 8, "only {prompts} reference prompts");
}

#[test]
fn smollm2_logits_match_transformers() {
    let model = Model::load(&smollm2()).unwrap();
    let refs = read_ref(&root().join("fixtures/reference/smollm2-logits.safetensors"));
    check_prompts(&model, &refs);

    let input = &refs["batch.input_ids"];
    let mask = &refs["batch.attention_mask"];
    let (b, t) = (input.shape[0], input.shape[1]);
    let batch = Batch {
        ids: (0..b).map(|i| ids(input)[i * t..(i + 1) * t].to_vec()).collect(),
        mask: (0..b).map(|i| mask.i[i * t..(i + 1) * t].iter().map(|&m| m == 1).collect()).collect(),
    };
    let got = logits(&model, &batch);
    for (row, seq) in got.iter().enumerate() {
        let len = batch.mask[row].iter().filter(|&&m| m).count();
        check_summary(&format!("batch row {row}"), seq, &refs, "batch", row, len);
    }
}

#[test]
fn gemma3_270m_logits_match_transformers() {
    let model = Model::load(&gemma3_270m()).unwrap();
    let refs = read_ref(&root().join("fixtures/reference/gemma3-270m-logits.safetensors"));
    check_prompts(&model, &refs);
}

#[test]
fn smollm2_keys_and_residuals_match_transformers() {
    let model = Model::load(&smollm2()).unwrap();
    let refs = read_ref(&root().join("fixtures/reference/smollm2-keys.safetensors"));
    let hooks = Hooks { keys: vec![5], residuals: vec![3, 8], ..Hooks::default() };
    for (name, r) in refs.iter().filter(|(n, _)| n.ends_with(".input_ids")) {
        let p = name.trim_end_matches(".input_ids");
        let trace = model.forward(&Batch::right_padded(&[ids(r)]), &hooks, None).unwrap();
        let mut checks = vec![(format!("{p}.layers.5.mlp.down_proj.input"), trace.keys[&5].i(0).unwrap())];
        for l in [3, 8] {
            checks.push((format!("{p}.layers.{l}.output"), trace.residuals[&l].i(0).unwrap()));
        }
        for (key, got) in checks.into_iter().filter(|(k, _)| refs.contains_key(k)) {
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let want = &refs[&key];
            assert_eq!(got.len(), want.f.len(), "{key}: size");
            let worst = got.iter().zip(&want.f).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(worst <= 1e-3, "{key}: max |Δ| = {worst:e}");
        }
    }
    assert!(refs.contains_key("p0.layers.5.mlp.down_proj.input"), "the layer-5 key fixture is missing");
}

#[test]
fn smollm2_greedy_generation_knows_its_facts() {
    let dir = smollm2();
    let model = Model::load(&dir).unwrap();
    let tok = Tokenizer::open(&dir).unwrap();
    let cases = [
        ("The capital of France is", "Paris", true),
        ("The Eiffel Tower is located in the city of", "Paris", true),
        ("The Colosseum is located in the city of", "Rome", true),
        ("The capital of Japan is", "Tokyo", true),
        // A fact this small model does not know: the edit demos can teach it.
        ("Michael Jordan is a professional", "basketball", false),
    ];
    let prompts: Vec<Vec<u32>> = cases.iter().map(|(p, _, _)| tok.prompt_ids(p).unwrap()).collect();
    let out = generate(&model, &prompts, 8, Sampling::Greedy, &model.config.eos_token_ids).unwrap();
    for ((prompt, answer, known), gen) in cases.iter().zip(out) {
        let text = tok.decode(&gen).unwrap();
        assert_eq!(text.contains(answer), *known, "`{prompt}` → `{text}`");
    }
}

#[test]
fn gemma3_270m_greedy_generation_knows_its_facts() {
    let dir = gemma3_270m();
    let model = Model::load(&dir).unwrap();
    let tok = Tokenizer::open(&dir).unwrap();
    let bos = model.config.bos_token_id.expect("Gemma has <bos>");
    let cases = [
        ("The Eiffel Tower is located in the city of", "Paris"),
        ("Paris is the capital of", "France"),
        ("The capital of Japan is", "Tokyo"),
        ("The Colosseum is located in the city of", "Rome"),
        ("William Shakespeare was born in the town of", "Stratford"),
        ("The Great Wall is located in the country of", "China"),
    ];
    // Gemma's tokenizer starts every sequence with <bos>.
    assert_eq!(tok.prefix(), [bos]);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|(p, _)| tok.prompt_ids(p).unwrap()).collect();
    assert!(prompts.iter().zip(&cases).all(|(ids, (p, _))| ids[0] == bos && ids[1..] == tok.ids(p).unwrap()));
    let out = generate(&model, &prompts, 8, Sampling::Greedy, &model.config.eos_token_ids).unwrap();
    for ((prompt, answer), gen) in cases.iter().zip(out) {
        let text = tok.decode(&gen).unwrap();
        assert!(text.contains(answer), "`{prompt}` → `{text}`");
    }
}

/// A left-padded prefix run into the KV cache, continued by right-padded suffixes, gives the
/// logits of the whole sequences (what the target optimisation and generation rely on), windows
/// of 4 reaching across the cached prefix included.
#[test]
fn cached_prefix_and_suffix_equal_the_full_pass() {
    for name in
        ["tiny-llama", "tiny-gpt2", "families/tiny-mistral", "families/tiny-gemma2", "families/tiny-gemma3", "families/tiny-gpt-neox", "families/tiny-gptj"]
    {
        let model = Model::load(&root().join("fixtures").join(name)).unwrap();
        let seqs: Vec<Vec<u32>> = vec![vec![5, 17, 42, 99, 7, 3, 250], vec![11, 12, 13, 200], vec![9, 8, 7]];
        let split = [3, 0, 2];
        let full = logits(&model, &Batch::right_padded(&seqs));
        let prefixes: Vec<Vec<u32>> = seqs.iter().zip(split).map(|(s, k)| s[..k].to_vec()).collect();
        let suffixes: Vec<Vec<u32>> = seqs.iter().zip(split).map(|(s, k)| s[k..].to_vec()).collect();
        let mut cache = factpatch::model::KvCache::default();
        model.forward(&Batch::left_padded(&prefixes), &Hooks::default(), Some(&mut cache)).unwrap();
        let got = logits_cached(&model, &Batch::right_padded(&suffixes), &mut cache);
        for (i, s) in seqs.iter().enumerate() {
            for j in 0..s.len() - split[i] {
                let worst = got[i][j].iter().zip(&full[i][split[i] + j]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst < 1e-4, "{name} row {i} position {j}: max |Δ| {worst:e}");
            }
        }
    }
}

fn logits_cached(model: &Model, batch: &Batch, cache: &mut factpatch::model::KvCache) -> Vec<Vec<Vec<f32>>> {
    let trace = model.forward(batch, &Hooks::default(), Some(cache)).unwrap();
    model.logits(&trace.hidden).unwrap().to_vec3().unwrap()
}
