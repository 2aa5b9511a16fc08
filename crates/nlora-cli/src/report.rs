//! `nlora report`: the paper's tables and figures from run directories.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use nlora_math::metrics::CollisionThreshold;
use nlora_report::{build_report, parse_task_pair, ReportOptions};

#[derive(Args)]
pub struct ReportArgs {
    /// Run directories written by `nlora run` (with metrics.json from `nlora metrics`).
    #[arg(required = true)]
    run_dirs: Vec<PathBuf>,
    /// The output folder for report.html, report.md and the PNGs.
    #[arg(long)]
    out: PathBuf,
    /// Adapter site of the collision maps (default: the first adapted site, e.g. model.layers.0.self_attn.q_proj).
    #[arg(long)]
    site: Option<String>,
    /// The two tasks of the collision maps, 1-based.
    #[arg(long, default_value = "1,2")]
    tasks: String,
    /// Collision maps: an entry of dW is non-zero when |dW| > TAU.
    #[arg(long, conflicts_with = "tau_rel")]
    tau: Option<f64>,
    /// Collision maps: |dW| > TAU_REL * (largest |dW| at the site over all tasks). Default 0.01, as `nlora metrics`.
    #[arg(long)]
    tau_rel: Option<f64>,
}

pub fn report(args: ReportArgs) -> Result<()> {
    let mut opts = ReportOptions::new(args.run_dirs, args.out);
    opts.site = args.site;
    opts.tasks = parse_task_pair(&args.tasks)?;
    match (args.tau, args.tau_rel) {
        (Some(t), _) => opts.threshold = CollisionThreshold::Absolute(t),
        (None, Some(f)) => opts.threshold = CollisionThreshold::RelativeToSiteMax(f),
        (None, None) => {}
    }
    let report = build_report(&opts)?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    println!(
        "written: {}, {} and {} figure(s) in {}",
        report.html.display(),
        report.markdown.display(),
        report.figures.len(),
        opts.out.display()
    );
    Ok(())
}
