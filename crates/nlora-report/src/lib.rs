//! Reports from run directories (`nlora report`): the paper's tables and
//! figures for one or more runs, as a self-contained report.html (PNGs
//! embedded as data URIs), report.md and the PNG files beside them.
//!
//! - the comparison of runs (method, order, AA, forgetting, BWT, OO, AWOM,
//!   GSR, ACR with its threshold) and the layouts of paper Tables 1 and 3;
//! - per run, the accuracy matrix as a heatmap and per-task accuracy curves;
//! - the collision map of one site and two tasks (Fig. 2);
//! - the first task's nuclear norm per site (Fig. 3), one y scale for all runs;
//! - GSR against ACR, one point per run, coloured by forgetting (Fig. 5);
//! - the sparsity ablation (Fig. 6) when its runs are among the inputs;
//! - beyond the paper: the capacity forecast (used fraction of positions,
//!   measured vs Theorem 2 CR, expected ACR after more tasks) and, per run,
//!   the live monitor's density, CR and auto lambda over training.
//!
//! Numbers come from results.json and metrics.json (`nlora run`, `nlora
//! metrics`) and monitor.json (the live monitor); the collision map reads the task adapters through
//! nlora-train's analysis, the same code that wrote metrics.json.
use std::path::{Path, PathBuf};

use nlora_math::metrics::{CollisionThreshold, SiteHistory};
use nlora_train::analysis::{describe, load_site_histories};

pub mod collision;
pub mod document;
pub mod error;
pub mod figures;
pub mod runs;

pub use document::Figure;
pub use error::{ReportError, Result};
pub use runs::Run;

use document::{Document, Section, Table};
use runs::{file_stem, natural_cmp};

/// What to report on and where.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Run directories written by `nlora run`.
    pub runs: Vec<PathBuf>,
    /// The output folder (created if missing).
    pub out: PathBuf,
    /// Adapter site of the collision maps; default: the first adapted site.
    pub site: Option<String>,
    /// The two tasks of the collision maps, 1-based.
    pub tasks: (usize, usize),
    /// When a dW entry counts as non-zero in the collision maps.
    pub threshold: CollisionThreshold,
}

impl ReportOptions {
    /// Defaults as `nlora metrics`: tasks 1 and 2, |dW| > 0.01 * the site's max.
    pub fn new(runs: Vec<PathBuf>, out: PathBuf) -> Self {
        ReportOptions {
            runs,
            out,
            site: None,
            tasks: (1, 2),
            threshold: CollisionThreshold::RelativeToSiteMax(0.01),
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    pub html: PathBuf,
    pub markdown: PathBuf,
    /// The figures, in the order of the report (also written as PNG files).
    pub figures: Vec<Figure>,
    pub runs: Vec<Run>,
    /// Everything missing from the inputs, as the report states it.
    pub notes: Vec<String>,
    /// The site the collision maps show.
    pub site: Option<String>,
}

/// Parses `--tasks i,j` (1-based, two different tasks).
pub fn parse_task_pair(s: &str) -> Result<(usize, usize)> {
    let bad = |reason: &str| ReportError::BadTasks {
        given: s.to_string(),
        reason: reason.to_string(),
    };
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| bad("give two task numbers separated by a comma, e.g. 1,2"))?;
    let parse = |x: &str| {
        x.trim()
            .parse::<usize>()
            .ok()
            .filter(|&k| k >= 1)
            .ok_or_else(|| bad("task numbers are whole numbers from 1 (the first task)"))
    };
    let (i, j) = (parse(a)?, parse(b)?);
    if i == j {
        return Err(bad("the two tasks must differ"));
    }
    Ok((i, j))
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}", x * 100.0))
        .unwrap_or_else(|| "—".into())
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "—".into())
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Methods and orders in the order they first appear among the runs
/// (orders sorted as a reader counts: order2 before order10).
fn methods_and_orders(runs: &[Run]) -> (Vec<String>, Vec<String>) {
    let mut methods: Vec<String> = Vec::new();
    let mut orders: Vec<String> = Vec::new();
    for r in runs {
        let (m, o) = (r.method(), r.order());
        if !methods.contains(&m) {
            methods.push(m);
        }
        if !orders.contains(&o) {
            orders.push(o);
        }
    }
    orders.sort_by(|a, b| natural_cmp(a, b));
    (methods, orders)
}

/// The mean of `f` over the runs of `method` on `order` that have it.
fn cell(runs: &[Run], method: &str, order: &str, f: &dyn Fn(&Run) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.method() == method && r.order() == order)
        .filter_map(f)
        .collect();
    mean(&v)
}

/// `f` of `method`'s runs, averaged per order and then over `orders`.
fn over_orders(
    runs: &[Run],
    method: &str,
    orders: &[String],
    f: &dyn Fn(&Run) -> Option<f64>,
) -> Option<f64> {
    mean(
        &orders
            .iter()
            .filter_map(|o| cell(runs, method, o, f))
            .collect::<Vec<_>>(),
    )
}

fn comparison_tables(runs: &[Run]) -> Vec<Table> {
    let header = [
        "run",
        "method",
        "order",
        "AA (%)",
        "forgetting (%)",
        "BWT (%)",
        "OO",
        "AWOM",
        "GSR",
        "ACR",
        "ACR threshold",
    ];
    let rows = runs
        .iter()
        .map(|r| {
            let res = r.results.as_ref();
            let m = r.metrics.as_ref();
            vec![
                r.name.clone(),
                r.method(),
                r.order(),
                pct(res.map(|x| x.average_accuracy)),
                pct(res.map(|x| x.forgetting)),
                pct(res.map(|x| x.bwt)),
                num(m.map(|x| x.orthogonal_overlap), 4),
                num(m.map(|x| x.awom), 4),
                num(r.mean_gsr(), 3),
                num(m.and_then(|x| x.acr), 3),
                m.map(|x| short_tau(&x.threshold))
                    .unwrap_or_else(|| "— (no metrics.json)".into()),
            ]
        })
        .collect();
    let mut tables = vec![Table {
        id: "comparison",
        caption: "Runs compared (one row per run). AA, forgetting and BWT from the accuracy matrix \
                  (exact match); OO, AWOM, ACR mean over adapter sites; GSR mean over sites and tasks."
            .into(),
        header: header.iter().map(|h| h.to_string()).collect(),
        rows,
    }];

    let (methods, orders) = methods_and_orders(runs);
    // Paper Table 1: methods x orders, average accuracy, with the mean over orders.
    let aa = |r: &Run| r.results.as_ref().map(|x| x.average_accuracy);
    let mut header = vec!["method".to_string()];
    header.extend(orders.iter().cloned());
    header.push("avg".into());
    let rows = methods
        .iter()
        .map(|m| {
            let cells: Vec<Option<f64>> = orders.iter().map(|o| cell(runs, m, o, &aa)).collect();
            let mut row = vec![m.clone()];
            row.extend(cells.iter().map(|c| pct(*c)));
            row.push(pct(mean(
                &cells.iter().flatten().copied().collect::<Vec<_>>(),
            )));
            row
        })
        .collect();
    tables.push(Table {
        id: "table1",
        caption: "Average accuracy (%) by method and order, as paper Table 1 \
                  (a cell is the mean over the runs given for it)."
            .into(),
        header,
        rows,
    });

    // Paper Table 3: orders x (OO per method, AWOM per method).
    let oo = |r: &Run| r.metrics.as_ref().map(|x| x.orthogonal_overlap);
    let awom = |r: &Run| r.metrics.as_ref().map(|x| x.awom);
    let mut header = vec!["order".to_string()];
    header.extend(methods.iter().map(|m| format!("OO (↓) {m}")));
    header.extend(methods.iter().map(|m| format!("AWOM (↓) {m}")));
    let metric_row = |label: String, row_orders: &[String]| {
        let mut row = vec![label];
        row.extend(
            methods
                .iter()
                .map(|m| num(over_orders(runs, m, row_orders, &oo), 4)),
        );
        row.extend(
            methods
                .iter()
                .map(|m| num(over_orders(runs, m, row_orders, &awom), 4)),
        );
        row
    };
    let mut rows: Vec<Vec<String>> = orders
        .iter()
        .map(|o| metric_row(o.clone(), std::slice::from_ref(o)))
        .collect();
    if orders.len() > 1 {
        rows.push(metric_row("avg".into(), &orders));
    }
    tables.push(Table {
        id: "table3",
        caption: "Orthogonal overlap (OO) and AWOM by order and method, as paper Table 3 (lower is more orthogonal)."
            .into(),
        header,
        rows,
    });
    tables
}

fn run_sections(runs: &[Run]) -> Result<Section> {
    let mut sec = Section::new(
        "Accuracy over the sequence, per run",
        "Left: the accuracy matrix (row = after training on task i, column = accuracy on task j, exact match, %). \
         Right: each task's accuracy after every stage; solid from the stage that trains it, dashed before, \
         so forgetting is the drop of a solid line.",
    );
    for r in runs {
        let Some(res) = &r.results else {
            sec.notes.push(format!(
                "{}: no accuracy heatmap or curves (results.json missing or unreadable).",
                r.name
            ));
            continue;
        };
        let stem = file_stem(&r.name);
        let title = format!("{} ({}): accuracy (%)", r.name, res.method);
        sec.figures.push(Figure {
            file: format!("accuracy-{stem}.png"),
            alt: format!("accuracy matrix of {}", r.name),
            caption: format!(
                "{}: accuracy matrix, AA {:.1}%, forgetting {:.1}%, BWT {:.1}%.",
                r.name,
                res.average_accuracy * 100.0,
                res.forgetting * 100.0,
                res.bwt * 100.0
            ),
            size: figures::HEATMAP_SIZE,
            png: figures::accuracy_heatmap(&title, &res.tasks, &res.accuracy_matrix)?,
        });
        sec.figures.push(Figure {
            file: format!("curves-{stem}.png"),
            alt: format!("per-task accuracy curves of {}", r.name),
            caption: format!(
                "{}: accuracy of each task after each stage of the sequence ({}).",
                r.name,
                res.tasks.join(" → ")
            ),
            size: figures::CURVES_SIZE,
            png: figures::accuracy_curves(
                &format!("{} ({}): per-task accuracy", r.name, res.method),
                &res.tasks,
                &res.accuracy_matrix,
            )?,
        });
    }
    Ok(sec)
}

fn sorted_sites(h: &[SiteHistory]) -> Vec<String> {
    let mut names: Vec<String> = h.iter().map(|s| s.name.clone()).collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    names
}

fn collision_section(
    runs: &[Run],
    opts: &ReportOptions,
    site_out: &mut Option<String>,
) -> Result<Section> {
    let (ti, tj) = opts.tasks;
    let mut sec = Section::new(
        "Collision maps (paper Fig. 2)",
        "Where two tasks' updates dW_i and dW_j of one adapter site are non-zero: grey = near zero in both, \
         green = task i only, blue = task j only, red = both (a collision, eq. 11). \
         CR (eq. 11) and OO (eq. 7, between the two tasks' lora_A) are computed on the full matrices.",
    );
    let mut histories: Vec<Option<Vec<SiteHistory>>> = Vec::new();
    for r in runs {
        if r.task_adapters == 0 {
            histories.push(None);
            continue;
        }
        match load_site_histories(&r.dir, 0) {
            Ok(h) => histories.push(Some(h)),
            Err(e) => {
                sec.notes
                    .push(format!("{}: cannot read the task adapters: {e}", r.name));
                histories.push(None);
            }
        }
    }
    let site = match &opts.site {
        Some(s) => {
            let known = histories
                .iter()
                .flatten()
                .any(|h| h.iter().any(|x| &x.name == s));
            if !known {
                let example = histories
                    .iter()
                    .flatten()
                    .find_map(|h| sorted_sites(h).into_iter().next())
                    .unwrap_or_else(|| "model.layers.0.self_attn.q_proj".into());
                return Err(ReportError::UnknownSite {
                    site: s.clone(),
                    example,
                });
            }
            s.clone()
        }
        None => match histories
            .iter()
            .flatten()
            .find_map(|h| sorted_sites(h).into_iter().next())
        {
            Some(s) => s,
            None => {
                sec.notes
                    .push("no run has task adapters: no collision maps.".into());
                return Ok(sec);
            }
        },
    };
    *site_out = Some(site.clone());
    sec.text.push_str(&format!(
        " Site `{site}`, tasks {ti} and {tj} (--site, --tasks); non-zero means {}.",
        describe(&opts.threshold)
    ));
    for (r, h) in runs.iter().zip(&histories) {
        let Some(h) = h else { continue };
        let Some(sh) = h.iter().find(|x| x.name == site) else {
            sec.notes.push(format!(
                "{}: no adapter site `{site}`: no collision map.",
                r.name
            ));
            continue;
        };
        let n = sh.tasks.len();
        if ti > n || tj > n {
            sec.notes.push(format!(
                "{}: has {n} task adapter(s), so tasks {ti} and {tj} cannot be compared: no collision map.",
                r.name
            ));
            continue;
        }
        let map = collision::collision_map(
            sh,
            ti - 1,
            tj - 1,
            opts.threshold,
            figures::COLLISION_MAX_CELLS,
        )?;
        let tasks = r.tasks();
        let name = |k: usize| {
            tasks
                .get(k - 1)
                .cloned()
                .unwrap_or_else(|| format!("task {k}"))
        };
        let (ni, nj) = (name(ti), name(tj));
        let title = format!(
            "{} ({}): {site}\ntask {ti} {ni} vs task {tj} {nj}: CR {:.3}, OO {:.3}",
            r.name,
            r.method(),
            map.collision_rate,
            map.orthogonal_overlap
        );
        let mut caption = format!(
            "{}: site {site}, task {ti} ({ni}, green) vs task {tj} ({nj}, blue). CR_{ti}{tj} = {:.4}, OO = {:.4}; \
             non-zero fraction {:.3} and {:.3}; non-zero: {}.",
            r.name,
            map.collision_rate,
            map.orthogonal_overlap,
            map.density_i,
            map.density_j,
            describe(&opts.threshold)
        );
        if map.factor > 1 {
            caption.push_str(&format!(
                " dW is {} × {}, drawn as {} × {} cells of {f} × {f} entries by max-pooling |dW|: a cell counts as \
                 non-zero for a task when its largest |dW| there does, so the map shows more colour (and more red) \
                 than the full matrix; CR is on the full matrix.",
                map.rows,
                map.cols,
                map.map_rows,
                map.map_cols,
                f = map.factor
            ));
        } else {
            caption.push_str(&format!(
                " dW is {} × {}, one cell per entry.",
                map.rows, map.cols
            ));
        }
        if r.method() == "seqlora" {
            caption.push_str(
                " SeqLoRA trains one adapter: \"task k\" is that adapter as it stood after task k, \
                 so its maps compare snapshots, not separate updates.",
            );
        }
        if let Some(m) = &r.metrics {
            if m.threshold != describe(&opts.threshold) {
                caption.push_str(&format!(
                    " (metrics.json's ACR used another threshold: {}.)",
                    m.threshold
                ));
            }
        }
        sec.figures.push(Figure {
            file: format!("collision-{}.png", file_stem(&r.name)),
            alt: format!("collision map of {}", r.name),
            caption,
            size: figures::COLLISION_SIZE,
            png: figures::collision_map(&title, (&ni, &nj), &map)?,
        });
    }
    Ok(sec)
}

/// A fraction as the capacity table prints it: four decimals, or three
/// significant digits in scientific form below 0.01 (CRs of sparse updates
/// are often 1e-4 and would print as 0.0001).
fn frac(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn capacity_section(runs: &[Run]) -> Result<Section> {
    let mut sec = Section::new(
        "Capacity forecast (beyond the paper)",
        "How much room the runs leave (from metrics.json, mean over adapter sites): the used fraction of \
         positions (non-zero in at least one task's dW), the mean density s of a task's dW, the measured mean CR \
         over task pairs (the ACR), Theorem 2's CR for independent supports (mean over pairs of s_i s_j) and their \
         ratio (1: supports independent; above 1: tasks crowd the same positions). The forecast adds N tasks at \
         the mean density: expected ACR over all tasks with the new pairs independent (Theorem 2), and with the new \
         pairs scaled by the measured ratio; expected used fraction 1 - (1 - used)(1 - s)^N.",
    );
    let mut horizons: Vec<usize> = runs
        .iter()
        .filter_map(|r| r.metrics.as_ref()?.capacity.as_ref())
        .flat_map(|c| c.forecast.iter().map(|p| p.more_tasks))
        .collect();
    horizons.sort_unstable();
    horizons.dedup();
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    let mut taus: Vec<String> = Vec::new();
    for r in runs {
        let Some(m) = &r.metrics else {
            sec.notes.push(format!(
                "{}: no capacity forecast (metrics.json missing or unreadable; run `nlora metrics {}`).",
                r.name,
                r.dir.display()
            ));
            continue;
        };
        let Some(c) = &m.capacity else {
            sec.notes.push(format!(
                "{}: metrics.json has no capacity forecast (written before nlora had one); \
                 run `nlora metrics {}` again.",
                r.name,
                r.dir.display()
            ));
            continue;
        };
        if !taus.contains(&m.threshold) {
            taus.push(m.threshold.clone());
        }
        let mut row = vec![
            r.name.clone(),
            m.tasks.len().to_string(),
            frac(c.used_fraction),
            frac(c.mean_density),
            c.measured_mean_cr.map(frac).unwrap_or_else(|| "—".into()),
            c.independent_mean_cr
                .map(frac)
                .unwrap_or_else(|| "—".into()),
            num(c.independence_ratio, 3),
        ];
        for h in &horizons {
            row.push(
                c.forecast
                    .iter()
                    .find(|p| p.more_tasks == *h)
                    .map(|p| {
                        format!(
                            "{} / {}",
                            frac(p.expected_acr),
                            frac(p.expected_acr_observed_ratio)
                        )
                    })
                    .unwrap_or_else(|| "—".into()),
            );
        }
        if let Some(&last) = horizons.last() {
            row.push(
                c.forecast
                    .iter()
                    .find(|p| p.more_tasks == last)
                    .map(|p| frac(p.expected_used_fraction))
                    .unwrap_or_else(|| "—".into()),
            );
        }
        rows.push(row);
        curves.push(figures::CapacityCurve {
            label: r.name.clone(),
            tasks: m.tasks.len(),
            measured_acr: c.measured_mean_cr,
            used_fraction: c.used_fraction,
            forecast: c.forecast.clone(),
        });
    }
    if rows.is_empty() {
        return Ok(sec);
    }
    let tau = match taus.as_slice() {
        [one] => one.clone(),
        _ => {
            sec.notes.push(format!(
                "the runs' thresholds differ ({}); their capacities are not comparable.",
                taus.join("; ")
            ));
            "thresholds differ".into()
        }
    };
    let mut header: Vec<String> = [
        "run",
        "tasks",
        "used fraction",
        "density per task",
        "measured mean CR",
        "independent mean CR (Thm 2)",
        "measured / independent",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    header.extend(
        horizons
            .iter()
            .map(|h| format!("ACR after +{h} (indep. / × ratio)")),
    );
    if let Some(last) = horizons.last() {
        header.push(format!("used after +{last}"));
    }
    sec.tables.push(Table {
        id: "capacity",
        caption: format!(
            "Capacity per run (mean over sites; non-zero means {tau}). \"ACR after +N\": expected ACR over all \
             tasks after N more, new pairs independent / scaled by the measured ratio."
        ),
        header,
        rows,
    });
    sec.figures.push(Figure {
        file: "capacity.png".into(),
        alt: "expected ACR and used fraction against the number of tasks".into(),
        caption: format!(
            "Expected ACR (left) and used fraction of positions (right) against the total number of tasks, \
             for {} run(s); the first point of a line is the run as measured, the next ones add {} tasks. \
             Solid: new pairs independent (Theorem 2); dashed: scaled by the run's measured / independent ratio. \
             Non-zero means {tau}.",
            curves.len(),
            horizons
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        size: figures::CAPACITY_SIZE,
        png: figures::capacity("Capacity forecast: more tasks at the observed density", &curves)?,
    });
    Ok(sec)
}

fn monitor_section(runs: &[Run]) -> Result<Section> {
    let mut sec = Section::new(
        "Live collision monitor and automatic lambda (beyond the paper)",
        "What the live monitor read during training (monitor.json), the tasks one after another: the current \
         task's density (fraction of its dW's positions above tau) with its 95 % Hoeffding band, and its collision \
         rate with the earlier tasks' updates (same tau, mean over those tasks), both means over adapter sites, \
         estimated on a fixed random sample of positions per site from the low-rank factors. With --lambda auto, \
         the target density is the dashed line and the lower panel shows lambda as the controller set it after \
         each reading.",
    );
    for r in runs {
        let Some(log) = &r.monitor else {
            sec.notes.push(format!(
                "{}: no monitor.json (trained before nlora had the live monitor, or with monitor.every = 0 and a \
                 fixed lambda): no monitor figure.",
                r.name
            ));
            continue;
        };
        let traces: Vec<figures::MonitorTrace> = log
            .stages
            .iter()
            .map(|s| figures::MonitorTrace {
                task: s.task.clone(),
                readings: s.readings.clone(),
            })
            .collect();
        let readings = traces.iter().map(|t| t.readings.len()).sum::<usize>();
        if readings == 0 {
            sec.notes.push(format!(
                "{}: monitor.json holds no readings: no monitor figure.",
                r.name
            ));
            continue;
        }
        let (offsets, _) = figures::monitor_offsets(&traces);
        let mut lambda: Vec<(f64, f64)> = Vec::new();
        let auto = traces
            .iter()
            .flat_map(|t| &t.readings)
            .any(|x| x.lambda.is_some());
        if auto {
            // Before the first reading the controller holds the configured lambda.
            if let Some(c) = &r.config {
                lambda.push((0.0, c.method.lambda_for(0)));
            }
            for (s, t) in traces.iter().enumerate() {
                for x in &t.readings {
                    if let Some(l) = x.lambda {
                        lambda.push(((offsets[s] + x.step) as f64, l));
                    }
                }
            }
        }
        let last: Vec<String> = traces
            .iter()
            .filter_map(|t| {
                let x = t.readings.last()?;
                let mut s = format!("{} ρ {:.3}", t.task, x.density);
                if let Some(cr) = x.collision_rate {
                    s.push_str(&format!(", CR {cr:.3}"));
                }
                if let Some(l) = x.lambda {
                    s.push_str(&format!(", λ {l:.2e}"));
                }
                Some(s)
            })
            .collect();
        let max_hw = traces
            .iter()
            .flat_map(|t| &t.readings)
            .map(|x| x.half_width_95)
            .fold(0.0, f64::max);
        let lambda_text = match log.target_density {
            Some(t) => format!("auto lambda, target density {t}"),
            None => match &r.config {
                Some(c) => format!(
                    "fixed lambda ({}), no lambda panel",
                    c.method
                        .lambda
                        .as_ref()
                        .map(|_| format!("{:.2e} for task 1", c.method.lambda_for(0)))
                        .unwrap_or_else(|| "the method's default".into())
                ),
                None => "fixed lambda, no lambda panel".into(),
            },
        };
        let title = format!(
            "{} ({}): live monitor, {}",
            r.name,
            r.method(),
            if log.target_density.is_some() {
                "auto lambda"
            } else {
                "fixed lambda"
            }
        );
        let png = figures::monitor(&title, &traces, log.target_density, &lambda)?;
        sec.figures.push(Figure {
            file: format!("monitor-{}.png", file_stem(&r.name)),
            alt: format!("live monitor of {}", r.name),
            caption: format!(
                "{}: {readings} readings over {} task(s); {lambda_text}. tau = {} × the site's largest |dW| so far \
                 (this and the earlier tasks, exact), densities and CRs on {} sampled positions per site \
                 (a site with fewer positions is read whole); 95 % band half-width at most {max_hw:.4}. \
                 Last reading per task: {}.",
                r.name,
                traces.len(),
                log.tau_rel,
                log.positions,
                last.join("; ")
            ),
            size: figures::monitor_size(&lambda),
            png,
        });
    }
    Ok(sec)
}

fn nuclear_section(runs: &[Run]) -> Result<Section> {
    let mut sec = Section::new(
        "Nuclear norm of the first task's update per site (paper Fig. 3)",
        "The nuclear norm ||dW||_* of task 1's update dW = (alpha/r) B A at every adapter site (layer.module), \
         an upper bound on how many of the r directions the task uses; dashed: the mean over sites. \
         All runs share one y scale.",
    );
    let with: Vec<&Run> = runs.iter().filter(|r| r.metrics.is_some()).collect();
    for r in runs.iter().filter(|r| r.metrics.is_none()) {
        sec.notes.push(format!(
            "{}: no nuclear-norm figure (metrics.json missing or unreadable; run `nlora metrics {}`).",
            r.name,
            r.dir.display()
        ));
    }
    let per_run: Vec<(Vec<String>, Vec<f64>)> = with
        .iter()
        .map(|r| {
            let m = r.metrics.as_ref().expect("filtered");
            let mut sites: Vec<_> = m.sites.iter().collect();
            sites.sort_by(|a, b| natural_cmp(&a.site, &b.site));
            (
                sites.iter().map(|s| s.site.clone()).collect(),
                sites
                    .iter()
                    .map(|s| s.nuclear_norm.first().copied().unwrap_or(0.0))
                    .collect(),
            )
        })
        .collect();
    let top = per_run
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max);
    let y_max = if top > 0.0 { top * 1.12 } else { 1.0 };
    for (r, (sites, values)) in with.iter().zip(&per_run) {
        let task = r
            .tasks()
            .first()
            .cloned()
            .unwrap_or_else(|| "task 1".into());
        let mean = mean(values).unwrap_or(0.0);
        sec.figures.push(Figure {
            file: format!("nuclear-{}.png", file_stem(&r.name)),
            alt: format!("nuclear norms of {}", r.name),
            caption: format!(
                "{} ({}): nuclear norm of task 1's ({task}) dW at each of {} sites, mean {mean:.3}; y axis 0 to {y_max:.3} for every run.",
                r.name,
                r.method(),
                values.len()
            ),
            size: figures::NUCLEAR_SIZE,
            png: figures::nuclear_norms(
                &format!("{} ({}): nuclear norm of task 1 ({task}) per site", r.name, r.method()),
                sites,
                values,
                y_max,
                figures::method_color(&r.method()),
            )?,
        });
    }
    Ok(sec)
}

fn sparsity_section(runs: &[Run]) -> Result<Section> {
    let mut sec = Section::new(
        "Sparsity, collisions and forgetting (paper Fig. 5)",
        "One point per run: GSR (generalized sparsity S*_{1,2} of dW, mean over sites and tasks; lower is sparser) \
         against ACR (eq. 10); the fill colour is the run's forgetting, the ring its method's colour.",
    );
    let mut points = Vec::new();
    let mut taus: Vec<String> = Vec::new();
    for r in runs {
        let point = (|| {
            let m = r.metrics.as_ref()?;
            Some(figures::SparsityPoint {
                label: r.name.clone(),
                method: r.method(),
                gsr: r.mean_gsr()?,
                acr: m.acr?,
                forgetting: r.results.as_ref()?.forgetting,
            })
        })();
        match point {
            Some(p) => {
                let tau = r.metrics.as_ref().map(|m| m.threshold.clone()).unwrap_or_default();
                if !taus.contains(&tau) {
                    taus.push(tau);
                }
                points.push(p);
            }
            None => sec.notes.push(format!(
                "{}: not in the scatter (needs results.json, metrics.json and at least two tasks for ACR).",
                r.name
            )),
        }
    }
    if points.is_empty() {
        return Ok(sec);
    }
    let tau = if taus.len() == 1 {
        taus[0].clone()
    } else {
        sec.notes.push(format!(
            "the runs' ACR thresholds differ ({}); their ACRs are not comparable.",
            taus.join("; ")
        ));
        "thresholds differ".into()
    };
    sec.figures.push(Figure {
        file: "gsr-acr.png".into(),
        alt: "GSR against ACR, one point per run".into(),
        caption: format!(
            "GSR against ACR for {} run(s); colour = forgetting. ACR threshold: {tau}.",
            points.len()
        ),
        size: figures::SCATTER_SIZE,
        png: figures::gsr_acr_scatter(
            &format!(
                "Sparsity vs collision vs forgetting (ACR: {})",
                short_tau(&tau)
            ),
            &points,
        )?,
    });
    Ok(sec)
}

/// Fig. 6 when the inputs hold sparsity-ablation runs (sa, sb, sab, ns).
fn ablation_section(runs: &[Run]) -> Result<Option<Section>> {
    let has = |m: &str| runs.iter().any(|r| r.method() == m && r.results.is_some());
    if !["sa", "sb", "sab", "ns"].iter().any(|m| has(m)) {
        return Ok(None);
    }
    let mut sec = Section::new(
        "Sparsity ablation (paper Fig. 6)",
        "Average accuracy of the ways to apply sparsity: NS none, SA l1 on A only, SB on B only, \
         SAB on A and B separately, Ours (N-LoRA) on dW = B A. A bar is the mean over the runs of that method.",
    );
    // NS is IncLoRA under the ablation's name; an inclora run stands in for it.
    let ns = if has("ns") { "ns" } else { "inclora" };
    let slots = [
        (if ns == "ns" { "NS" } else { "NS (inclora)" }, ns),
        ("SA", "sa"),
        ("SB", "sb"),
        ("SAB", "sab"),
        ("Ours", "nlora"),
    ];
    let mut bars = Vec::new();
    for (label, method) in slots {
        let aa: Vec<f64> = runs
            .iter()
            .filter(|r| r.method() == method)
            .filter_map(|r| r.results.as_ref().map(|x| x.average_accuracy))
            .collect();
        match mean(&aa) {
            Some(v) => bars.push(figures::AblationBar {
                label: label.to_string(),
                method: method.to_string(),
                average_accuracy: v,
                runs: aa.len(),
            }),
            None => sec
                .notes
                .push(format!("no {method} run with results: no {label} bar.")),
        }
    }
    let counts = bars
        .iter()
        .map(|b| format!("{} {} run(s)", b.label, b.runs))
        .collect::<Vec<_>>()
        .join(", ");
    sec.figures.push(Figure {
        file: "ablation.png".into(),
        alt: "sparsity ablation, average accuracy per method".into(),
        caption: format!("Average accuracy (%) per ablation method ({counts})."),
        size: figures::ABLATION_SIZE,
        png: figures::ablation_bars("Sparsity ablation: average accuracy", &bars)?,
    });
    Ok(Some(sec))
}

/// `|dW| > 0.01 * max over tasks of max|dW| at the site` -> `tau 0.01 x site max`:
/// the thresholds `describe` writes, short enough for a figure title.
fn short_tau(t: &str) -> String {
    let Some(rest) = t.strip_prefix("|dW| > ") else {
        return t.to_string();
    };
    match rest.split_once(" * ") {
        Some((f, "max over tasks of max|dW| at the site")) => format!("τ = {f} × site max |dW|"),
        Some((f, "max|dW_k| (per task)")) => format!("τ = {f} × task max |dW|"),
        None => format!("τ = {rest}"),
        _ => t.to_string(),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    nlora_train::rundir::atomic_write(path, bytes).map_err(|e| ReportError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Builds the report of `opts.runs` into `opts.out`: report.html, report.md
/// and the PNGs. Missing files in a run become notes in the report; a path
/// that is not a run directory is an error naming it.
pub fn build_report(opts: &ReportOptions) -> Result<Report> {
    if opts.runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    if opts.tasks.0 == 0 || opts.tasks.1 == 0 || opts.tasks.0 == opts.tasks.1 {
        return Err(ReportError::BadTasks {
            given: format!("{},{}", opts.tasks.0, opts.tasks.1),
            reason: "two different task numbers from 1".into(),
        });
    }
    opts.threshold.validate()?;
    let mut runs = opts
        .runs
        .iter()
        .map(|p| Run::load(p))
        .collect::<Result<Vec<_>>>()?;
    runs::make_names_unique(&mut runs);
    let notes: Vec<String> = runs
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("{}: {n}", r.name)))
        .collect();

    let mut comparison = Section::new("Comparison", "");
    comparison.tables = comparison_tables(&runs);
    let mut site = None;
    let mut sections = vec![comparison, sparsity_section(&runs)?];
    if let Some(s) = ablation_section(&runs)? {
        sections.push(s);
    }
    sections.push(nuclear_section(&runs)?);
    sections.push(collision_section(&runs, opts, &mut site)?);
    sections.push(capacity_section(&runs)?);
    sections.push(monitor_section(&runs)?);
    sections.push(run_sections(&runs)?);

    let doc = Document {
        title: "nlora report".into(),
        intro: format!(
            "{} run(s): {}. Figures follow the N-LoRA paper's Tables 1 and 3 and Figures 2, 3, 5 and 6; \
             the capacity forecast and the live monitor go beyond the paper.",
            runs.len(),
            runs.iter()
                .map(|r| format!("{} ({})", r.name, r.dir.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        notes: notes.clone(),
        sections,
    };
    let figures: Vec<Figure> = doc
        .sections
        .iter()
        .flat_map(|s| s.figures.iter().cloned())
        .collect();
    for f in &figures {
        write(&opts.out.join(&f.file), &f.png)?;
    }
    let markdown = opts.out.join("report.md");
    write(&markdown, doc.to_markdown().as_bytes())?;
    let html = opts.out.join("report.html");
    write(&html, doc.to_html().as_bytes())?;
    Ok(Report {
        html,
        markdown,
        figures,
        runs,
        notes,
        site,
    })
}
