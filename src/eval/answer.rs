//! Matching generated answers: SQuAD's answer normalisation for open-domain QA, and the final
//! number of a worked solution for GSM8K.

/// SQuAD's `normalize_answer`: lower case, ASCII punctuation removed, the articles `a`, `an`,
/// `the` removed, whitespace collapsed to single spaces.
pub fn normalize(text: &str) -> String {
    let lower: String = text.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    lower.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

/// Whether `prediction` equals one of `answers` once both are normalised.
pub fn exact_match(prediction: &str, answers: &[String]) -> bool {
    let p = normalize(prediction);
    answers.iter().any(|a| normalize(a) == p)
}

/// The value of the last number in `text`: digits with optional thousands commas, a decimal
/// point and a leading minus sign (`$1,234.50` → 1234.5; a sentence's final period is not a
/// decimal point).
pub fn last_number(text: &str) -> Option<f64> {
    let bytes = text.as_bytes();
    let mut last = None;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = if i > 0 && bytes[i - 1] == b'-' { i - 1 } else { i };
        let mut end = i;
        while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b',' || bytes[end] == b'.') {
            end += 1;
        }
        let digits: String = text[start..end].trim_end_matches(['.', ',']).chars().filter(|&c| c != ',').collect();
        last = digits.parse::<f64>().ok().or(last);
        i = end;
    }
    last
}

/// The gold answer of a GSM8K solution: the number after its final `####`.
pub fn gsm8k_gold(solution: &str) -> Option<f64> {
    let (_, tail) = solution.rsplit_once("####")?;
    last_number(tail)
}
