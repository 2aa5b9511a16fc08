//! Exact match after normalisation, as the reference scores generations.
//!
//! The O-LoRA / N-LoRA evaluation (`compute_metrics.py`, from
//! Super-NaturalInstructions) uses SQuAD v1.1's `normalize_answer`
//! *without* removing articles: lower-case, drop ASCII punctuation
//! (Python's `string.punctuation`), collapse whitespace. Keeping articles
//! matters here: COPA's answers are "A" / "B", which SQuAD's version would
//! erase.
//!
//! The Python built-ins are mirrored: `str.lower` is Unicode lower-casing
//! (Rust's `to_lowercase`), and `str.split()` splits on Python whitespace,
//! which besides Unicode `White_Space` includes the separators U+001C..U+001F.

/// Python's `string.punctuation`.
pub const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// The reference's answer cue; a decoder-only model's answer follows the
/// last one in its decoded output.
pub const ANSWER_CUE: &str = "Answer:";

/// Python's `str.isspace`.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Lower-case, remove ASCII punctuation, collapse whitespace runs to one
/// space and trim (the reference's `normalize_answer`).
pub fn normalize_answer(s: &str) -> String {
    let lowered = s.to_lowercase();
    let no_punct: String = lowered
        .chars()
        .filter(|c| !PUNCTUATION.contains(*c))
        .collect();
    no_punct
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `prediction` equals `reference` after [`normalize_answer`].
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(reference)
}

/// The reference's post-processing of decoder-only output (`skip_instructions`):
/// the text after the last [`ANSWER_CUE`], whitespace-trimmed; `""` when the
/// cue is absent (the reference scores such outputs as wrong). Applied to
/// the decoded prompt + continuation, this is the continuation unless the
/// model itself wrote "Answer:" again.
pub fn extract_answer(decoded: &str) -> &str {
    match decoded.rfind(ANSWER_CUE) {
        Some(i) => decoded[i + ANSWER_CUE.len()..].trim_matches(is_py_space),
        None => "",
    }
}

/// Fraction of `predictions` that exactly match their `references`
/// (0 for no pairs). Panics if the lengths differ (a caller bug).
pub fn accuracy<P: AsRef<str>, R: AsRef<str>>(predictions: &[P], references: &[R]) -> f64 {
    assert_eq!(
        predictions.len(),
        references.len(),
        "accuracy: {} predictions for {} references",
        predictions.len(),
        references.len()
    );
    if predictions.is_empty() {
        return 0.0;
    }
    let hits = predictions
        .iter()
        .zip(references)
        .filter(|(p, r)| exact_match(p.as_ref(), r.as_ref()))
        .count();
    hits as f64 / predictions.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_matches_the_reference_definition() {
        // Expected values written from the Python definition
        // ' '.join(''.join(c for c in s.lower() if c not in string.punctuation).split()).
        assert_eq!(
            normalize_answer("  Science or Technology. "),
            "science or technology"
        );
        assert_eq!(normalize_answer("Society & Culture"), "society culture");
        assert_eq!(normalize_answer("Society &Culture"), "society culture");
        assert_eq!(normalize_answer("very\tpositive\n"), "very positive");
        assert_eq!(normalize_answer("SST-2"), "sst2");
        assert_eq!(normalize_answer("A"), "a"); // articles are kept
        assert_eq!(normalize_answer("the Album"), "the album");
        assert_eq!(normalize_answer("-"), "");
        assert_eq!(normalize_answer("a\u{1f}b"), "a b");
        assert_eq!(normalize_answer("Éte\u{a0}ÉTÉ"), "éte été"); // Unicode lower, NBSP is whitespace
        assert_eq!(normalize_answer("don’t"), "don’t"); // U+2019 is not ASCII punctuation
    }

    #[test]
    fn exact_match_compares_normalised_strings() {
        assert!(exact_match("World", "world"));
        assert!(exact_match(" Business!", "Business"));
        assert!(!exact_match("Business and more", "Business"));
        assert!(!exact_match("B", "A"));
        assert!(exact_match(
            "Science or Technology",
            "science  or technology"
        ));
    }

    #[test]
    fn answer_extraction_follows_the_last_cue() {
        assert_eq!(extract_answer("Task:TC\n...\nAnswer: World "), "World");
        assert_eq!(
            extract_answer("...\nAnswer:Sports\nAnswer: Business"),
            "Business"
        );
        assert_eq!(extract_answer("no cue here"), "");
    }

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy(&["a", "B", "x"], &["A", "b", "y"]), 2.0 / 3.0);
        assert_eq!(accuracy::<&str, &str>(&[], &[]), 0.0);
    }
}
