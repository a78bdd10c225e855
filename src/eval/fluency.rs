//! Generation fluency as ROME measures it (`n_gram_entropy` in `eval_utils_counterfact.py`):
//! the weighted entropy of a text's word bigrams and trigrams, high for varied text and low
//! for text that repeats itself.

use std::collections::HashMap;

/// `(n, weight)` of ROME's n-gram entropy: bigrams weigh 2/3, trigrams 4/3.
const WEIGHTS: [(usize, f64); 2] = [(2, 2.0 / 3.0), (3, 4.0 / 3.0)];

/// The words of `text`: runs of letters and digits, and every other non-space character on its
/// own (a close stand-in for `nltk.word_tokenize`, which ROME uses).
pub fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            out.push(&text[s..i]);
        }
        if !c.is_whitespace() {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

/// The Shannon entropy, in bits, of the frequency distribution of the `n`-grams of `words`
/// (0 when there are none).
pub fn ngram_entropy(words: &[&str], n: usize) -> f64 {
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let total = counts.values().sum::<usize>() as f64;
    let mut freqs: Vec<f64> = counts.values().map(|&c| c as f64 / total).collect();
    // A fixed summation order: the map's iteration order is random.
    freqs.sort_by(f64::total_cmp);
    freqs.iter().map(|p| -p * p.log2()).sum()
}

/// One text's fluency: the mean of the weighted bigram and trigram entropies,
/// `(2/3·H₂ + 4/3·H₃) / 2`.
pub fn text_entropy(text: &str) -> f64 {
    let w = words(text);
    WEIGHTS.iter().map(|&(n, weight)| weight * ngram_entropy(&w, n)).sum::<f64>() / WEIGHTS.len() as f64
}

/// The mean of [`text_entropy`] over `texts` (papers print it ×100, ≈ 620 for GPT-2 XL).
pub fn fluency(texts: &[String]) -> f64 {
    texts.iter().map(|t| text_entropy(t)).sum::<f64>() / texts.len() as f64
}
