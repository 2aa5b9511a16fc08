//! The report built from real run directories: the engine's tiny end-to-end
//! run (a random 2-layer LLaMA with SmolLM2's tokenizer, three benchmark
//! tasks, a handful of examples) for N-LoRA, IncLoRA and the SA ablation,
//! with metrics.json from nlora-train's analysis; and a copy of the N-LoRA
//! run without metrics.json.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nlora_math::metrics::CollisionThreshold;
use nlora_report::{build_report, collision, figures, ReportError, ReportOptions};
use nlora_train::analysis::{load_site_histories, run_metrics, RunMetrics};
use nlora_train::config::{MethodName, RunConfig};
use nlora_train::engine::{run, RunOptions};
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
}

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
        Fixture {
            root,
            runs,
            no_metrics,
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
    let mut expected = vec!["gsr-acr.png".to_string(), "ablation.png".to_string()];
    for run in ["run-nlora", "run-inclora", "run-sa"] {
        for kind in ["accuracy", "curves", "collision", "nuclear"] {
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
