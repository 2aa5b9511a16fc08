//! The live collision monitor and the automatic lambda in the engine, on the
//! tiny LLaMA and three real tasks: readings equal the exact figures when
//! every position is sampled, lambda moves against the density error and is
//! carried from task to task, and a run stopped inside a task resumes to the
//! same adapters, readings and lambdas.
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use nlora_train::config::{AutoLambda, MethodName, RunConfig};
use nlora_train::engine::{run, MonitorLog, RunOptions, MONITOR_FILE};
use nlora_train::fault::NAN_ENV;
use nlora_train::testing::{data_dir, tiny_run_config, write_tiny_llama};
use nlora_train::TrainError;

/// The fault hook reads the environment: tests of this binary take turns.
static ENV: Mutex<()> = Mutex::new(());

fn opts(out: &Path, resume: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        progress: false,
    }
}

fn monitor_log(dir: &Path) -> MonitorLog {
    serde_json::from_str(&std::fs::read_to_string(dir.join(MONITOR_FILE)).unwrap()).unwrap()
}

/// dW = scale B A of every site of a saved task adapter, in f64, by site.
fn updates(task_dir: &Path, scale: f64) -> Vec<(String, Tensor)> {
    let t =
        candle_core::safetensors::load(task_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut sites: Vec<String> = t
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight").map(str::to_string))
        .collect();
    sites.sort();
    sites
        .into_iter()
        .map(|s| {
            let a = t[&format!("{s}.lora_A.weight")]
                .to_dtype(DType::F64)
                .unwrap();
            let b = t[&format!("{s}.lora_B.weight")]
                .to_dtype(DType::F64)
                .unwrap();
            let dw = (b.matmul(&a).unwrap() * scale).unwrap();
            (s, dw)
        })
        .collect()
}

fn on(dw: &Tensor, tau: f64) -> Vec<bool> {
    dw.flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|v| v.abs() > tau)
        .collect()
}

fn max_abs(dw: &Tensor) -> f64 {
    dw.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn readings_equal_the_exact_figures_when_every_position_is_sampled() {
    let _turn = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 2).unwrap();
    let mut cfg = tiny_run_config(&model, MethodName::NLora);
    cfg.monitor.every = 1;
    // 4096 >= 32 x 32: the tiny model's sites are sampled whole.
    cfg.monitor.positions = 4096;
    let out = tmp.path().join("run");
    run(cfg.clone(), &data_dir(), &opts(&out, false)).unwrap();
    let log = monitor_log(&out);
    assert_eq!(log.stages.len(), 3);
    assert_eq!(log.target_density, None);
    let tasks = ["task-1-dbpedia", "task-2-amazon", "task-3-CB"];
    let scale = cfg.model.alpha / cfg.model.r as f64;
    let per_task: Vec<_> = tasks.iter().map(|t| updates(&out.join(t), scale)).collect();
    for (s, stage) in log.stages.iter().enumerate() {
        // 6 examples, batch 3: two steps, each read.
        let steps: Vec<usize> = stage.readings.iter().map(|r| r.step).collect();
        assert_eq!(steps, [1, 2], "stage {s}");
        let last = stage.readings.last().unwrap();
        assert_eq!(last.half_width_95, 0.0, "sampled whole: no sampling error");
        let (mut density, mut cr) = (0f64, 0f64);
        for (k, (site, dw)) in per_task[s].iter().enumerate() {
            let tau = 0.01
                * (0..=s)
                    .map(|t| max_abs(&per_task[t][k].1))
                    .fold(0f64, f64::max);
            let cur = on(dw, tau);
            density += cur.iter().filter(|&&x| x).count() as f64 / cur.len() as f64;
            if s > 0 {
                let mut site_cr = 0f64;
                for earlier in per_task.iter().take(s) {
                    assert_eq!(&earlier[k].0, site);
                    let prev = on(&earlier[k].1, tau);
                    site_cr += prev.iter().zip(&cur).filter(|(p, c)| **p && **c).count() as f64
                        / cur.len() as f64;
                }
                cr += site_cr / s as f64;
            }
        }
        let n = per_task[s].len() as f64;
        // The monitor takes the max in f32 and the values in f64: at most
        // one position of one site may fall on the other side of tau.
        let one = 1.0 / (n * 512.0) + 1e-12;
        assert!(
            (last.density - density / n).abs() <= one,
            "stage {s}: monitor {} exact {}",
            last.density,
            density / n
        );
        assert!(last.density > 0.0 && last.density <= 1.0);
        match last.collision_rate {
            None => assert_eq!(s, 0, "CR is read from the second task on"),
            Some(m) => assert!((m - cr / n).abs() <= one, "stage {s}: CR {m} vs {}", cr / n),
        }
        assert!(last.lambda.is_none(), "no controller without auto lambda");
    }
}

fn auto_config(model: &Path) -> RunConfig {
    let mut cfg = tiny_run_config(model, MethodName::NLora);
    cfg.method.auto_lambda = Some(AutoLambda::new(0.3));
    cfg.monitor.every = 0;
    cfg.monitor.positions = 300;
    cfg.train.checkpoint_every = 1;
    cfg.train.epochs = nlora_train::config::PerTask::One(2);
    cfg.eval.rank_classification = false;
    cfg
}

#[test]
fn auto_lambda_moves_against_the_density_error_and_resumes_identically() {
    let _turn = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 3).unwrap();
    let cfg = auto_config(&model);
    let reference = tmp.path().join("ref");
    run(cfg.clone(), &data_dir(), &opts(&reference, false)).unwrap();
    let log = monitor_log(&reference);
    assert_eq!(log.target_density, Some(0.3));
    let readings: Vec<_> = log.stages.iter().flat_map(|s| s.readings.clone()).collect();
    // two epochs of two batches per task, a reading after every step
    assert_eq!(readings.len(), 3 * 4);
    let mut lambda = cfg.method.lambda_for(0);
    let mut moved = 0;
    for r in &readings {
        let next = r.lambda.expect("auto lambda records lambda");
        let want = (r.density - 0.3).signum();
        let got = (next / lambda).ln().signum();
        if r.density != 0.3 {
            assert_eq!(
                got, want,
                "density {} took lambda {lambda} to {next}",
                r.density
            );
            moved += 1;
        }
        // the sampled bound for 4 sites of 300 positions
        assert!(r.half_width_95 > 0.0 && r.half_width_95 < 0.05);
        lambda = next; // carried into the next step and the next task
    }
    assert!(moved >= 10);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["controller"]["lambda"].as_f64(), Some(lambda));

    // Stopped inside task 2 after its first step's checkpoint, then resumed.
    let stopped = tmp.path().join("stopped");
    std::env::set_var(NAN_ENV, "loss:2:3");
    let err = run(cfg.clone(), &data_dir(), &opts(&stopped, false));
    std::env::remove_var(NAN_ENV);
    assert!(matches!(err, Err(TrainError::NonFinite { .. })), "{err:?}");
    run(cfg, &data_dir(), &opts(&stopped, true)).unwrap();
    assert_eq!(monitor_log(&stopped), log);
    for t in ["task-1-dbpedia", "task-2-amazon", "task-3-CB"] {
        let f = |d: &Path| std::fs::read(d.join(t).join("adapter_model.safetensors")).unwrap();
        assert!(f(&reference) == f(&stopped), "{t} differs after resume");
    }
    assert_eq!(
        std::fs::read_to_string(reference.join("results.json")).unwrap(),
        std::fs::read_to_string(stopped.join("results.json")).unwrap()
    );
}

#[test]
fn auto_lambda_is_refused_for_a_method_without_an_l1_term() {
    let _turn = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let mut cfg = tiny_run_config(Path::new("/nonexistent"), MethodName::OLora);
    cfg.method.auto_lambda = Some(AutoLambda::new(0.3));
    let err = cfg.validate(3).unwrap_err().to_string();
    assert!(
        err.contains("auto_lambda") && err.contains("olora"),
        "{err}"
    );
    cfg.method.name = MethodName::NLora;
    cfg.method.auto_lambda = Some(AutoLambda::new(1.5));
    let err = cfg.validate(3).unwrap_err().to_string();
    assert!(
        err.contains("target_density") && err.contains("1.5"),
        "{err}"
    );
}
