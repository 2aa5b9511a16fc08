//! The report built from real run directories: the engine's tiny end-to-end
//! run (a random 2-layer LLaMA with SmolLM2's tokenizer, three benchmark
//! tasks, a handful of examples) for N-LoRA, IncLoRA and the SA ablation,
//! with metrics.json from nlora-train's analysis; an N-LoRA run with auto
//! lambda and a reading after every step; a copy of the N-LoRA run without
//! metrics.json; and one as older nlora left it (no monitor.json, no
//! capacity forecast in metrics.json).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nlora_math::metrics::CollisionThreshold;
use nlora_report::{build_report, collision, figures, ReportError, ReportOptions};
use nlora_train::analysis::{load_site_histories, run_metrics, RunMetrics};
use nlora_train::config::{AutoLambda, MethodName, RunConfig};
use nlora_train::engine::{run, MonitorLog, RunOptions, MONITOR_FILE};
use nlora_train::testing::{data_dir, tiny_run_config, write_tiny_llama};

const METHODS: [MethodName; 3] = [MethodName::NLora, MethodName::IncLora, MethodName::SparseA];

fn tiny_config(model: &Path, method: MethodName) -> RunConfig {
    tiny_run_config(model, method)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

struct Fixture {
    root: PathBuf,
    /// run-nlora, run-inclora, run-sa: complete (results + metrics).
    runs: Vec<PathBuf>,
    /// run-nlora without metrics.json.
    no_metrics: PathBuf,
    /// N-LoRA with auto lambda (target density 0.3), a monitor reading after
    /// every step on 300 sampled positions per site; with metrics.json.
    auto: PathBuf,
    /// run-nlora as older nlora wrote it: no monitor.json, metrics.json
    /// without `capacity`.
    old: PathBuf,
}

const AUTO_TARGET: f64 = 0.3;
const AUTO_POSITIONS: usize = 300;

/// Built once per test process (the tests of this file share it).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nlora-report-fixture");
        let _ = std::fs::remove_dir_all(&root);
        let model = root.join("model");
        write_tiny_llama(&model, 1).unwrap();
        let mut runs = Vec::new();
        for m in METHODS {
            let out = root.join(format!("run-{}", m.as_str()));
            run(
                tiny_config(&model, m),
                &data_dir(),
                &RunOptions {
                    out: out.clone(),
                    resume: false,
                    progress: false,
                },
            )
            .unwrap_or_else(|e| panic!("{} failed: {e}", m.as_str()));
            run_metrics(&out, CollisionThreshold::RelativeToSiteMax(0.01)).unwrap();
            runs.push(out);
        }
        let no_metrics = root.join("run-nometrics");
        copy_dir(&runs[0], &no_metrics);
        std::fs::remove_file(no_metrics.join("metrics.json")).unwrap();

        let auto = root.join("run-auto");
        let mut cfg = tiny_config(&model, MethodName::NLora);
        cfg.method.auto_lambda = Some(AutoLambda::new(AUTO_TARGET));
        cfg.monitor.every = 1;
        // Fewer than a site's 512 or 1024 positions: a sampled, banded reading.
        cfg.monitor.positions = AUTO_POSITIONS;
        cfg.train.epochs = nlora_train::config::PerTask::One(2);
        run(
            cfg,
            &data_dir(),
            &RunOptions {
                out: auto.clone(),
                resume: false,
                progress: false,
            },
        )
        .unwrap_or_else(|e| panic!("auto lambda run failed: {e}"));
        run_metrics(&auto, CollisionThreshold::RelativeToSiteMax(0.01)).unwrap();

        let old = root.join("run-old");
        copy_dir(&runs[0], &old);
        std::fs::remove_file(old.join(MONITOR_FILE)).unwrap();
        let mut metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(old.join("metrics.json")).unwrap())
                .unwrap();
        metrics.as_object_mut().unwrap().remove("capacity").unwrap();
        for site in metrics["sites"].as_array_mut().unwrap() {
            site.as_object_mut().unwrap().remove("capacity");
        }
        std::fs::write(
            old.join("metrics.json"),
            serde_json::to_string_pretty(&metrics).unwrap(),
        )
        .unwrap();
        Fixture {
            root,
            runs,
            no_metrics,
            auto,
            old,
        }
    })
}

fn out_dir(name: &str) -> PathBuf {
    let d = fixture().root.join("out").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Decodes a PNG to 8-bit RGB(A) and returns (width, height, channels, pixels).
fn decode_png(bytes: &[u8]) -> (u32, u32, usize, Vec<u8>) {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane size")];
    let info = reader.next_frame(&mut buf).expect("PNG image data");
    buf.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    (info.width, info.height, channels, buf)
}

/// Variance of the grey level over all pixels: 0 for a blank image.
fn grey_variance(channels: usize, pixels: &[u8]) -> f64 {
    let grey: Vec<f64> = pixels
        .chunks(channels)
        .map(|p| {
            if channels >= 3 {
                (p[0] as f64 + p[1] as f64 + p[2] as f64) / 3.0
            } else {
                p[0] as f64
            }
        })
        .collect();
    let mean = grey.iter().sum::<f64>() / grey.len() as f64;
    grey.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / grey.len() as f64
}

/// Grey-level variance a figure must exceed: a white canvas has 0; 1% of the
/// pixels black on white already gives ~640.
const MIN_VARIANCE: f64 = 100.0;

#[test]
fn every_png_decodes_with_its_size_and_is_not_blank() {
    let f = fixture();
    let out = out_dir("complete");
    let report = build_report(&ReportOptions::new(f.runs.clone(), out.clone())).unwrap();
    assert!(report.notes.is_empty(), "{:?}", report.notes);

    let mut names: Vec<&str> = report.figures.iter().map(|f| f.file.as_str()).collect();
    names.sort();
    let mut expected = vec![
        "gsr-acr.png".to_string(),
        "ablation.png".to_string(),
        "capacity.png".to_string(),
    ];
    for run in ["run-nlora", "run-inclora", "run-sa"] {
        // monitor: the default monitor reads each task's last step.
        for kind in ["accuracy", "curves", "collision", "nuclear", "monitor"] {
            expected.push(format!("{kind}-{run}.png"));
        }
    }
    expected.sort();
    assert_eq!(names, expected);

    let md = std::fs::read_to_string(&report.markdown).unwrap();
    let html = std::fs::read_to_string(&report.html).unwrap();
    for fig in &report.figures {
        let on_disk = std::fs::read(out.join(&fig.file)).unwrap();
        assert_eq!(on_disk, fig.png, "{} differs on disk", fig.file);
        let (w, h, channels, pixels) = decode_png(&on_disk);
        assert_eq!((w, h), fig.size, "{}", fig.file);
        let var = grey_variance(channels, &pixels);
        assert!(
            var > MIN_VARIANCE,
            "{} looks blank: grey variance {var}",
            fig.file
        );
        assert!(
            md.contains(&format!("]({})", fig.file)),
            "report.md lacks {}",
            fig.file
        );
    }
    // Self-contained: every image is a data URI, nothing is fetched.
    assert_eq!(
        html.matches("<img src=\"data:image/png;base64,").count(),
        report.figures.len()
    );
    assert!(!html.contains("src=\"http") && !html.contains("<link"));
    // Sizes match the figure constants the HTML declares.
    assert!(report
        .figures
        .iter()
        .any(|f| f.size == figures::COLLISION_SIZE && f.file.starts_with("collision-")));
}

#[test]
fn collision_maps_agree_with_metrics_json() {
    let f = fixture();
    let nlora = &f.runs[0];
    let metrics: RunMetrics =
        serde_json::from_str(&std::fs::read_to_string(nlora.join("metrics.json")).unwrap())
            .unwrap();
    let histories = load_site_histories(nlora, 0).unwrap();
    let threshold = CollisionThreshold::RelativeToSiteMax(0.01);
    for site in &metrics.sites {
        let h = histories.iter().find(|h| h.name == site.site).unwrap();
        let pairs = [(0, 1), (0, 2), (1, 2)];
        let mut sum = 0.0;
        for (i, j) in pairs {
            let map =
                collision::collision_map(h, i, j, threshold, figures::COLLISION_MAX_CELLS).unwrap();
            // The tiny model's 32 x 32 / 16 x 32 updates are drawn entry by
            // entry, so the red cells are exactly the collisions of eq. 11.
            assert_eq!(map.factor, 1);
            let red = map
                .cells
                .iter()
                .filter(|c| **c == collision::Cell::Both)
                .count();
            assert_eq!(red as f64 / map.cells.len() as f64, map.collision_rate);
            assert_eq!(map.density_i, site.density[i], "{}", site.site);
            sum += map.collision_rate;
        }
        let acr = site.average_collision_rate.unwrap();
        assert!(
            (sum / 3.0 - acr).abs() < 1e-12,
            "{}: {} vs {acr}",
            site.site,
            sum / 3.0
        );
    }
}

#[test]
fn missing_metrics_gives_a_report_that_says_so() {
    let f = fixture();
    let out = out_dir("missing");
    let runs = vec![f.runs[0].clone(), f.no_metrics.clone()];
    let report = build_report(&ReportOptions::new(runs, out)).unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("run-nometrics: metrics.json missing")),
        "{:?}",
        report.notes
    );
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    let html = std::fs::read_to_string(&report.html).unwrap();
    for text in [&md, &html] {
        assert!(text.contains("run-nometrics: metrics.json missing"));
        assert!(text.contains("nlora metrics"), "the note says what to run");
        assert!(text.contains("run-nometrics: no nuclear-norm figure"));
    }
    assert!(html.contains("class=\"note\""));
    // The run still has its accuracy figures and collision map (adapters are there).
    let files: Vec<&str> = report.figures.iter().map(|f| f.file.as_str()).collect();
    for want in [
        "accuracy-run-nometrics.png",
        "curves-run-nometrics.png",
        "collision-run-nometrics.png",
    ] {
        assert!(files.contains(&want), "{files:?}");
    }
    assert!(!files.contains(&"nuclear-run-nometrics.png"));
    // Its table row shows the accuracy numbers and dashes for the geometry.
    let row = md
        .lines()
        .find(|l| l.starts_with("| run-nometrics |"))
        .unwrap();
    assert!(row.contains("| — |"), "{row}");
}

#[test]
fn a_folder_that_is_not_a_run_is_an_error_naming_it() {
    let f = fixture();
    let empty = f.root.join("not-a-run");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "hello").unwrap();
    let missing = f.root.join("does-not-exist");
    for bad in [&empty, &missing] {
        let err = build_report(&ReportOptions::new(
            vec![f.runs[0].clone(), bad.clone()],
            out_dir("bad"),
        ))
        .expect_err("not a run directory");
        assert!(matches!(err, ReportError::NotARunDir { .. }), "{err}");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }
    // An unknown --site names itself and shows what sites look like.
    let mut opts = ReportOptions::new(f.runs.clone(), out_dir("bad-site"));
    opts.site = Some("model.layers.9.mlp.up_proj".into());
    let err = build_report(&opts).expect_err("unknown site");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.9.mlp.up_proj")
            && msg.contains("model.layers.0.self_attn.q_proj"),
        "{msg}"
    );
}

#[test]
fn chosen_site_and_tasks_appear_and_out_of_range_tasks_are_a_note() {
    let f = fixture();
    let mut opts = ReportOptions::new(vec![f.runs[0].clone()], out_dir("site"));
    opts.site = Some("model.layers.1.self_attn.v_proj".into());
    opts.tasks = (3, 1);
    let report = build_report(&opts).unwrap();
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    assert!(
        md.contains(
            "site model.layers.1.self_attn.v_proj, task 3 (CB, green) vs task 1 (dbpedia, blue)"
        ),
        "{md}"
    );
    assert!(md.contains("dW is 16 × 32, one cell per entry"));

    opts.tasks = (1, 4);
    opts.out = out_dir("site-range");
    let report = build_report(&opts).unwrap();
    assert!(!report
        .figures
        .iter()
        .any(|f| f.file.starts_with("collision-")));
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    assert!(md.contains("tasks 1 and 4 cannot be compared"), "{md}");
}

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("NLORA_CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "NLORA_CHROMIUM={} does not exist", p.display());
        return p;
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium not found at /usr/bin/chromium: install it \
                 (`apt-get install -y chromium`, as .ci/run does) or set NLORA_CHROMIUM"
            )
        })
}

/// Runs Chromium headless on `url` with `args`, returning stdout; killed
/// (and the test failed) if it does not finish in two minutes.
fn run_chromium(profile: &Path, args: &[String], url: &str) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().expect("chromium starts");
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(out) => {
            let out = out.unwrap();
            assert!(
                out.status.success(),
                "chromium failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
            panic!("chromium did not finish within 120 s");
        }
    }
}

/// Appended to a copy of report.html: on load, writes what the browser made
/// of the page into the DOM, which --dump-dom then prints.
const CHECK_SCRIPT: &str = r#"<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {
    images: imgs.map(function (i) { return [i.getAttribute('data-file'), i.complete, i.naturalWidth, i.naturalHeight]; }),
    rows: document.querySelectorAll('#comparison tbody tr').length,
    header: document.querySelectorAll('#comparison thead th').length
  };
  var pre = document.createElement('pre');
  pre.id = 'nlora-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"#;

#[test]
fn report_html_loads_in_headless_chromium() {
    let f = fixture();
    let out = out_dir("browser");
    let mut runs = f.runs.clone();
    runs.push(f.no_metrics.clone());
    runs.push(f.auto.clone());
    let report = build_report(&ReportOptions::new(runs.clone(), out.clone())).unwrap();
    let html = std::fs::read_to_string(&report.html).unwrap();
    let checked = out.join("check.html");
    std::fs::write(
        &checked,
        html.replace("</body>", &format!("{CHECK_SCRIPT}</body>")),
    )
    .unwrap();
    let url = format!("file://{}", checked.display());
    let profile = out.join("chromium-profile");

    let dom = run_chromium(
        &profile,
        &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
        &url,
    );
    let start = dom.find("<pre id=\"nlora-check\">").unwrap_or_else(|| {
        panic!(
            "the check script did not run; DOM tail: {}",
            &dom[dom.len().saturating_sub(500)..]
        )
    });
    let body = &dom[start + "<pre id=\"nlora-check\">".len()..];
    let json = body[..body.find("</pre>").unwrap()]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let check: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        check["rows"],
        runs.len(),
        "one comparison row per run: {check}"
    );
    assert_eq!(check["header"], 11, "{check}");
    let images = check["images"].as_array().unwrap();
    assert_eq!(images.len(), report.figures.len(), "{check}");
    for (img, fig) in images.iter().zip(&report.figures) {
        assert_eq!(img[0], fig.file.as_str());
        assert_eq!(img[1], true, "{} not loaded", fig.file);
        assert_eq!(img[2], fig.size.0, "{} naturalWidth", fig.file);
        assert_eq!(img[3], fig.size.1, "{} naturalHeight", fig.file);
    }

    // A screenshot of the rendered page: a real image, not a blank page.
    let shot = out.join("screenshot.png");
    run_chromium(
        &profile,
        &[
            "--virtual-time-budget=5000".into(),
            "--window-size=1280,2400".into(),
            format!("--screenshot={}", shot.display()),
        ],
        &format!("file://{}", report.html.display()),
    );
    let (w, h, channels, pixels) = decode_png(&std::fs::read(&shot).expect("screenshot written"));
    assert_eq!((w, h), (1280, 2400));
    let var = grey_variance(channels, &pixels);
    assert!(
        var > MIN_VARIANCE,
        "screenshot looks blank: grey variance {var}"
    );
}

/// Pixels within a small distance of `color` in rows `rows` of an RGB(A) image.
fn count_color(
    (w, channels, pixels): (u32, usize, &[u8]),
    rows: std::ops::Range<u32>,
    color: (u8, u8, u8),
) -> usize {
    let w = w as usize;
    (rows.start as usize..rows.end as usize)
        .flat_map(|y| (0..w).map(move |x| (y * w + x) * channels))
        .filter(|&i| {
            let d = |a: u8, b: u8| (a as i32 - b as i32).abs();
            d(pixels[i], color.0) + d(pixels[i + 1], color.1) + d(pixels[i + 2], color.2) <= 12
        })
        .count()
}

const DENSITY_BLUE: (u8, u8, u8) = (31, 119, 180);
const CR_RED: (u8, u8, u8) = (214, 39, 40);
const LAMBDA_PURPLE: (u8, u8, u8) = (148, 103, 189);

fn markdown_table<'a>(md: &'a str, caption_start: &str) -> (Vec<&'a str>, Vec<Vec<&'a str>>) {
    let mut lines = md
        .lines()
        .skip_while(|l| !l.starts_with(caption_start))
        .skip(2);
    let cells = |l: &'a str| -> Vec<&'a str> {
        l.trim()
            .trim_start_matches('|')
            .trim_end_matches('|')
            .split(" | ")
            .map(str::trim)
            .collect()
    };
    let header = cells(lines.next().expect("a table header"));
    let rows = lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(cells)
        .collect();
    (header, rows)
}

fn close(cell: &str, want: f64, what: &str) {
    let got: f64 = cell
        .parse()
        .unwrap_or_else(|_| panic!("{what}: `{cell}` is not a number"));
    // Four decimals, or three significant digits below 0.01.
    let tol = if want.abs() < 0.01 {
        5e-3 * want.abs()
    } else {
        5e-5
    };
    assert!(
        (got - want).abs() <= tol + 1e-15,
        "{what}: table {got}, metrics.json {want}"
    );
}

#[test]
fn monitor_figure_shows_density_cr_target_and_lambda() {
    let f = fixture();
    let log: MonitorLog =
        serde_json::from_str(&std::fs::read_to_string(f.auto.join(MONITOR_FILE)).unwrap()).unwrap();
    assert_eq!(log.target_density, Some(AUTO_TARGET));
    // 6 examples, batch 3, 2 epochs: 4 steps per task, each read.
    let readings: Vec<_> = log.stages.iter().flat_map(|s| &s.readings).collect();
    assert_eq!(readings.len(), 12);
    assert!(readings
        .iter()
        .all(|r| r.lambda.is_some() && r.half_width_95 > 0.0));

    let out = out_dir("monitor");
    let report = build_report(&ReportOptions::new(
        vec![f.auto.clone(), f.runs[1].clone()],
        out.clone(),
    ))
    .unwrap();
    let fig = report
        .figures
        .iter()
        .find(|x| x.file == "monitor-run-auto.png")
        .expect("a monitor figure for the auto-lambda run");
    assert_eq!(fig.size, figures::MONITOR_SIZE);
    let (w, h, channels, pixels) = decode_png(&std::fs::read(out.join(&fig.file)).unwrap());
    assert_eq!((w, h), figures::MONITOR_SIZE);
    assert!(grey_variance(channels, &pixels) > MIN_VARIANCE);
    // Density and CR are drawn in the top panel (60 % of the height), lambda
    // in the bottom one only.
    let split = h * 60 / 100;
    let img = (w, channels, pixels.as_slice());
    let blue_top = count_color(img, 0..split, DENSITY_BLUE);
    let red_top = count_color(img, 0..split, CR_RED);
    let purple_top = count_color(img, 0..split, LAMBDA_PURPLE);
    let purple_bottom = count_color(img, split..h, LAMBDA_PURPLE);
    eprintln!("auto monitor pixels: blue {blue_top} red {red_top} purple top {purple_top} bottom {purple_bottom}");
    assert!(blue_top > 300, "density line: {blue_top} px");
    assert!(red_top > 150, "CR line (tasks 2 and 3): {red_top} px");
    assert!(purple_bottom > 300, "lambda line: {purple_bottom} px");
    assert_eq!(purple_top, 0, "lambda drawn in the density panel");
    assert!(
        fig.caption.contains("12 readings over 3 task(s)")
            && fig.caption.contains("auto lambda, target density 0.3")
            && fig.caption.contains("tau = 0.01 ×")
            && fig
                .caption
                .contains(&format!("{AUTO_POSITIONS} sampled positions")),
        "{}",
        fig.caption
    );
    // The last lambda of the log is in the caption as the controller left it.
    let last = log.stages[2].readings.last().unwrap().lambda.unwrap();
    assert!(
        fig.caption.contains(&format!("λ {last:.2e}")),
        "{}",
        fig.caption
    );

    // A fixed-lambda run: one reading per task (the default monitor reads the
    // last step), no lambda panel.
    let fixed = report
        .figures
        .iter()
        .find(|x| x.file == "monitor-run-inclora.png")
        .expect("a monitor figure for the fixed-lambda run");
    assert_eq!(fixed.size, figures::MONITOR_SIZE_FIXED_LAMBDA);
    let (w, h, channels, pixels) = decode_png(&fixed.png);
    assert_eq!((w, h), figures::MONITOR_SIZE_FIXED_LAMBDA);
    let img = (w, channels, pixels.as_slice());
    assert!(count_color(img, 0..h, DENSITY_BLUE) > 50);
    assert_eq!(count_color(img, 0..h, LAMBDA_PURPLE), 0);
    assert!(fixed.caption.contains("fixed lambda"), "{}", fixed.caption);
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    assert!(md.contains("](monitor-run-auto.png)") && md.contains("](monitor-run-inclora.png)"));
}

#[test]
fn capacity_table_equals_metrics_json() {
    let f = fixture();
    let mut runs = f.runs.clone();
    runs.push(f.auto.clone());
    let out = out_dir("capacity");
    let report = build_report(&ReportOptions::new(runs.clone(), out.clone())).unwrap();
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    let (header, rows) = markdown_table(&md, "**Capacity per run");
    assert_eq!(
        header,
        [
            "run",
            "tasks",
            "used fraction",
            "density per task",
            "measured mean CR",
            "independent mean CR (Thm 2)",
            "measured / independent",
            "ACR after +1 (indep. / × ratio)",
            "ACR after +5 (indep. / × ratio)",
            "ACR after +15 (indep. / × ratio)",
            "ACR after +100 (indep. / × ratio)",
            "used after +100",
        ]
    );
    assert_eq!(rows.len(), runs.len());
    for (dir, row) in runs.iter().zip(&rows) {
        let m: RunMetrics =
            serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap())
                .unwrap();
        let c = m
            .capacity
            .as_ref()
            .expect("metrics.json has a capacity forecast");
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(row[0], name);
        assert_eq!(row[1], "3");
        close(row[2], c.used_fraction, "used fraction");
        close(row[3], c.mean_density, "density");
        close(row[4], c.measured_mean_cr.unwrap(), "measured CR");
        close(row[5], c.independent_mean_cr.unwrap(), "independent CR");
        let ratio: f64 = row[6].parse().unwrap();
        assert!((ratio - c.independence_ratio.unwrap()).abs() <= 5e-4);
        // The measured mean CR is the run's ACR (both mean over sites of the
        // mean over pairs).
        assert!((c.measured_mean_cr.unwrap() - m.acr.unwrap()).abs() < 1e-12);
        assert_eq!(c.forecast.len(), 4);
        for (k, p) in c.forecast.iter().enumerate() {
            let (a, b) = row[7 + k].split_once(" / ").unwrap();
            close(a, p.expected_acr, "expected ACR");
            close(b, p.expected_acr_observed_ratio, "expected ACR x ratio");
        }
        close(
            row[11],
            c.forecast[3].expected_used_fraction,
            "used after +100",
        );
        eprintln!("{}", row.join(" | "));
    }
    let fig = report
        .figures
        .iter()
        .find(|x| x.file == "capacity.png")
        .expect("a capacity figure");
    let (w, h, channels, pixels) = decode_png(&std::fs::read(out.join("capacity.png")).unwrap());
    assert_eq!((w, h), figures::CAPACITY_SIZE);
    assert_eq!(fig.size, figures::CAPACITY_SIZE);
    assert!(grey_variance(channels, &pixels) > MIN_VARIANCE);
    assert!(fig.caption.contains("for 4 run(s)") && fig.caption.contains("1, 5, 15, 100"));
}

#[test]
fn runs_without_monitor_or_capacity_give_notes_not_failures() {
    let f = fixture();
    let broken = f.root.join("run-brokenmonitor");
    let _ = std::fs::remove_dir_all(&broken);
    copy_dir(&f.runs[0], &broken);
    std::fs::write(broken.join(MONITOR_FILE), "{").unwrap();
    let out = out_dir("old");
    let report = build_report(&ReportOptions::new(
        vec![f.old.clone(), f.no_metrics.clone(), broken.clone()],
        out,
    ))
    .unwrap();
    let files: Vec<&str> = report.figures.iter().map(|x| x.file.as_str()).collect();
    // capacity.png from the one run that has a forecast (the broken-monitor copy).
    for want in [
        "nuclear-run-old.png",
        "accuracy-run-old.png",
        "capacity.png",
    ] {
        assert!(files.contains(&want), "{files:?}");
    }
    for absent in ["monitor-run-old.png", "monitor-run-brokenmonitor.png"] {
        assert!(!files.contains(&absent), "{files:?}");
    }
    // A run too old for monitor.json is not missing an input; a broken one is.
    assert!(
        !report.notes.iter().any(|n| n.starts_with("run-old:")),
        "{:?}",
        report.notes
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("run-brokenmonitor: monitor.json unreadable")),
        "{:?}",
        report.notes
    );
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    let html = std::fs::read_to_string(&report.html).unwrap();
    let old = f.old.display().to_string();
    for text in [&md, &html] {
        assert!(text.contains("run-old: no monitor.json"), "{text}");
        assert!(text.contains(&format!(
            "run-old: metrics.json has no capacity forecast (written before nlora had one); run `nlora metrics {old}` again"
        )));
        assert!(text.contains("run-nometrics: no capacity forecast (metrics.json missing"));
    }
    let (_, rows) = markdown_table(&md, "**Capacity per run");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], "run-brokenmonitor");
}
