//! Errors of the math room: every message names the site, matrix entry or
//! parameter at fault and what to do about it.

/// Everything that can go wrong in `nlora-math`. (Fields are self-describing and
/// spelled out by each variant's message.)
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum MathError {
    /// A penalty or metric was asked for over an empty set of adapter sites.
    #[error("{what}: no adapter sites given; pass at least one site")]
    NoSites { what: &'static str },

    /// A site's matrices do not have the PEFT shapes lora_A (r x in), lora_B (out x r).
    #[error("{site}: {detail}")]
    Shape { site: String, detail: String },

    /// The reference-code N-LoRA form `||lora_A @ lora_B||_1` only type-checks when in == out.
    #[error(
        "{site}: the reference-code N-LoRA form ||lora_A @ lora_B||_1 needs in_features == \
         out_features, but lora_A is {r}x{in_features} and lora_B is {out_features}x{r} \
         (e.g. a grouped-query v_proj); use the paper form NLoraForm::Update for this model"
    )]
    ReferenceCodeNotSquare {
        site: String,
        r: usize,
        in_features: usize,
        out_features: usize,
    },

    /// A hyperparameter (lambda, scale, threshold) is negative, NaN or infinite.
    #[error("{name} = {value} is invalid: {reason}")]
    InvalidParameter {
        name: &'static str,
        value: f64,
        reason: &'static str,
    },

    /// A matrix handed to a metric holds NaN or infinity.
    #[error("{what}: entry ({row}, {col}) is {value}, not a finite number")]
    NonFinite {
        what: String,
        row: usize,
        col: usize,
        value: f64,
    },

    /// The accuracy matrix is not T x T (or the zero-shot row is not of length T).
    #[error("accuracy matrix: {detail}")]
    AccuracyShape { detail: String },

    /// An accuracy lies outside [0, 1].
    #[error(
        "accuracy matrix: {what} = {value} is not in [0, 1]; give accuracies as fractions, \
         not percent"
    )]
    AccuracyOutOfRange { what: String, value: f64 },

    /// A metric needs an accuracy-matrix entry that was not evaluated.
    #[error(
        "{metric} needs a[{after_task}][{on_task}] (accuracy on task {on_task} after training \
         task {after_task}, 0-based), which was not evaluated"
    )]
    MissingAccuracy {
        metric: &'static str,
        after_task: usize,
        on_task: usize,
    },

    /// A metric is undefined for this few tasks (e.g. forgetting with T = 1).
    #[error("{metric} needs at least {needed} tasks, got {got}")]
    TooFewTasks {
        metric: &'static str,
        needed: usize,
        got: usize,
    },

    /// A metric that needs a zero-shot row was called without one.
    #[error(
        "{metric} needs the zero-shot accuracies of the untrained model; \
         build the matrix with AccuracyMatrix::with_zero_shot"
    )]
    MissingZeroShot { metric: &'static str },

    /// nalgebra's SVD did not converge (should not happen for finite input).
    #[error("{what}: the singular value decomposition did not converge")]
    SvdDidNotConverge { what: String },

    /// An error from candle (device, dtype, matmul).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`MathError`].
pub type Result<T> = std::result::Result<T, MathError>;

/// "site 3 `model.layers.1.self_attn.v_proj`", or "site 3" without a name.
pub(crate) fn site_label(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("site {index} `{name}`"),
        None => format!("site {index}"),
    }
}
