//! Seeded, label-stratified sampling and the validation split.
//!
//! **Validation comes out of train.json.** In the distributed benchmark
//! dev.json is byte-identical to test.json, so choosing anything (lambda,
//! learning rate, epochs) on dev.json would be choosing it on the test set.
//! nlora therefore carves a validation split out of train.json — seeded,
//! stratified by label, disjoint from the training examples — and never
//! selects on dev.json or test.json.
//!
//! Procedure for a task, given a seed:
//! 1. validation = stratified sample of `validation` records of train.json;
//! 2. train = stratified sample of `max_train` records of the rest of train.json;
//! 3. test = stratified sample of `max_test` records of test.json.
//!
//! The validation split does not depend on `max_train`, and each task's
//! samples do not depend on which other tasks are in the order.
//!
//! Stratified: each label gets a share proportional to its frequency
//! (largest remainders), but at least one example whenever `n >=` the number
//! of labels present, so small subsets keep every class. With fewer than
//! that, `n` labels are chosen at random, one example each. Returned
//! examples are in file order; shuffling for SGD is the trainer's job.
//!
//! **Stability.** The random stream is ChaCha8 ([`rand_chacha`]), a fixed
//! cipher: its output for a given key does not change across crate versions.
//! The key is built here from the seed, the task name and the purpose, and
//! the shuffle and bounded draws are written out below, so the same seed
//! selects the same examples on every platform and every version of
//! `rand`. (rand's `StdRng` and `SliceRandom` make no such promise.)
use std::collections::HashMap;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::benchmark::{Example, Task, TaskType};
use crate::error::{DataError, Result};

/// How much of each task to use. The default takes everything, with no
/// validation split, seed 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplingConfig {
    /// Seed of every draw.
    pub seed: u64,
    /// Training examples per task (`None`: all of train.json left after the
    /// validation split).
    pub max_train: Option<usize>,
    /// Validation examples per task, carved out of train.json (0: none).
    pub validation: usize,
    /// Test examples per task (`None`: all of test.json).
    pub max_test: Option<usize>,
}

/// The examples of one task that a run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledTask {
    /// Task name.
    pub name: String,
    /// Task type.
    pub task_type: TaskType,
    /// labels.json.
    pub labels: Vec<String>,
    /// Training examples (from train.json).
    pub train: Vec<Example>,
    /// Validation examples (from train.json, disjoint from `train`).
    pub validation: Vec<Example>,
    /// Test examples (from test.json).
    pub test: Vec<Example>,
}

/// What a random stream is used for; part of the stream's key.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
enum Purpose {
    Validation = 1,
    Train = 2,
    Test = 3,
}

/// Sample `task` according to `config` (see the module docs).
pub fn sample_task(task: &Task, config: &SamplingConfig) -> Result<SampledTask> {
    let err = |problem: String| DataError::Sampling {
        task: task.name.clone(),
        problem,
    };
    if config.max_train == Some(0) {
        return Err(err(
            "max_train is 0: a task needs at least one training example".into(),
        ));
    }
    if config.max_test == Some(0) {
        return Err(err(
            "max_test is 0: a task needs at least one test example".into()
        ));
    }
    if config.validation >= task.train.len() {
        return Err(err(format!(
            "a validation split of {} leaves no training examples (train.json has {})",
            config.validation,
            task.train.len()
        )));
    }
    let mut rng = stream(config.seed, &task.name, Purpose::Validation);
    let validation_idx = stratified_indices(&task.train, config.validation, &mut rng);
    let mut in_validation = vec![false; task.train.len()];
    for &i in &validation_idx {
        in_validation[i] = true;
    }
    let pool: Vec<Example> = task
        .train
        .iter()
        .zip(&in_validation)
        .filter(|(_, &v)| !v)
        .map(|(e, _)| e.clone())
        .collect();
    let n_train = config.max_train.unwrap_or(pool.len());
    let mut rng = stream(config.seed, &task.name, Purpose::Train);
    let train_idx = stratified_indices(&pool, n_train, &mut rng);
    let n_test = config.max_test.unwrap_or(task.test.len());
    let mut rng = stream(config.seed, &task.name, Purpose::Test);
    let test_idx = stratified_indices(&task.test, n_test, &mut rng);
    Ok(SampledTask {
        name: task.name.clone(),
        task_type: task.task_type,
        labels: task.labels.clone(),
        train: pick(&pool, &train_idx),
        validation: pick(&task.train, &validation_idx),
        test: pick(&task.test, &test_idx),
    })
}

fn pick(examples: &[Example], idx: &[usize]) -> Vec<Example> {
    idx.iter().map(|&i| examples[i].clone()).collect()
}

/// The random stream for (seed, task, purpose). The 256-bit ChaCha key is
/// seed (8 bytes LE) | FNV-1a-64 of the task name (8 bytes LE) | purpose
/// (8 bytes LE) | zeros.
fn stream(seed: u64, task: &str, purpose: Purpose) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&fnv1a64(task.as_bytes()).to_le_bytes());
    key[16..24].copy_from_slice(&(purpose as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Uniform integer in `0..n` (`n > 0`) by rejection: unbiased and defined
/// here, so it cannot change with a dependency's version.
fn below(rng: &mut impl RngCore, n: usize) -> usize {
    let n = n as u64;
    let zone = u64::MAX - (u64::MAX % n); // a multiple of n
    loop {
        let x = rng.next_u64();
        if x < zone {
            return (x % n) as usize;
        }
    }
}

/// Fisher-Yates shuffle with [`below`].
fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i + 1);
        items.swap(i, j);
    }
}

/// Indices (ascending) of a label-stratified sample of `n` of `examples`;
/// all indices if `n >= examples.len()`. See the module docs.
pub fn stratified_indices(examples: &[Example], n: usize, rng: &mut impl RngCore) -> Vec<usize> {
    if n >= examples.len() {
        return (0..examples.len()).collect();
    }
    if n == 0 {
        return Vec::new();
    }
    // Classes in order of first appearance, each with its indices shuffled.
    let mut class_of: HashMap<&str, usize> = HashMap::new();
    let mut classes: Vec<Vec<usize>> = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        let k = *class_of.entry(e.label.as_str()).or_insert_with(|| {
            classes.push(Vec::new());
            classes.len() - 1
        });
        classes[k].push(i);
    }
    for members in &mut classes {
        shuffle(members, rng);
    }
    let mut chosen: Vec<usize> = if n < classes.len() {
        // Too few to keep every class: n random classes, one example each.
        let mut order: Vec<usize> = (0..classes.len()).collect();
        shuffle(&mut order, rng);
        order[..n].iter().map(|&k| classes[k][0]).collect()
    } else {
        let sizes: Vec<usize> = classes.iter().map(Vec::len).collect();
        allocate(&sizes, n)
            .into_iter()
            .zip(&classes)
            .flat_map(|(count, members)| members[..count].iter().copied())
            .collect()
    };
    chosen.sort_unstable();
    chosen
}

/// How many of each class to take for a sample of `n` (`classes <= n <=
/// total`, all sizes > 0): largest-remainder proportional shares, raised to
/// at least 1 per class, the excess taken back from the classes most above
/// their share. Integer arithmetic only, ties to the lower class index.
pub(crate) fn allocate(sizes: &[usize], n: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    debug_assert!(sizes.len() <= n && n <= total && sizes.iter().all(|&s| s > 0));
    // share_k = n * size_k / total, compared exactly as n * size_k vs alloc * total.
    let scaled: Vec<u128> = sizes.iter().map(|&s| n as u128 * s as u128).collect();
    let total128 = total as u128;
    let mut alloc: Vec<usize> = scaled
        .iter()
        .map(|&x| ((x / total128) as usize).max(1))
        .collect();
    let mut sum: usize = alloc.iter().sum();
    // Too few: give one more to the classes with the largest remainders.
    while sum < n {
        let k = (0..sizes.len())
            .filter(|&k| alloc[k] < sizes[k])
            .max_by(|&a, &b| {
                let ra = scaled[a] as i128 - (alloc[a] as u128 * total128) as i128;
                let rb = scaled[b] as i128 - (alloc[b] as u128 * total128) as i128;
                ra.cmp(&rb).then(b.cmp(&a))
            })
            .expect("n <= total leaves room in some class");
        alloc[k] += 1;
        sum += 1;
    }
    // Too many (the minimum of one): take back from those most above their share.
    while sum > n {
        let k = (0..sizes.len())
            .filter(|&k| alloc[k] > 1)
            .max_by(|&a, &b| {
                let ea = (alloc[a] as u128 * total128) as i128 - scaled[a] as i128;
                let eb = (alloc[b] as u128 * total128) as i128 - scaled[b] as i128;
                ea.cmp(&eb).then(b.cmp(&a))
            })
            .expect("n >= classes leaves a class above one");
        alloc[k] -= 1;
        sum -= 1;
    }
    alloc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{prop_assert, prop_assert_eq, proptest};

    #[test]
    fn chacha8_stream_is_the_specified_cipher() {
        // First output of ChaCha8 with an all-zero key and nonce: fixed by the
        // cipher, so a change here means sampled examples changed.
        let mut rng = ChaCha8Rng::from_seed([0u8; 32]);
        let first = rng.next_u32();
        assert_eq!(first, 0x2fef003e, "ChaCha8 keystream changed: {first:#x}");
    }

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn allocation_is_proportional_when_no_class_needs_raising() {
        assert_eq!(allocate(&[50, 30, 20], 10), vec![5, 3, 2]);
        // 7 * (50, 30, 20) / 100 = 3.5, 2.1, 1.4: remainders give the 7th to class 0.
        assert_eq!(allocate(&[50, 30, 20], 7), vec![4, 2, 1]);
    }

    #[test]
    fn allocation_raises_rare_classes_to_one() {
        // CB-like: 119, 115, 16 with n = 3 -> one each.
        assert_eq!(allocate(&[119, 115, 16], 3), vec![1, 1, 1]);
        assert_eq!(allocate(&[990, 5, 5], 10), vec![8, 1, 1]);
    }

    proptest! {
        #[test]
        fn allocation_invariants(sizes in proptest::collection::vec(1usize..200, 1..15), frac in 0.0f64..=1.0) {
            let total: usize = sizes.iter().sum();
            let k = sizes.len();
            let n = k + ((total - k) as f64 * frac) as usize;
            let a = allocate(&sizes, n);
            prop_assert_eq!(a.iter().sum::<usize>(), n);
            for (x, s) in a.iter().zip(&sizes) {
                prop_assert!(*x >= 1 && x <= s);
            }
            // Never further than one example from the proportional share,
            // unless raised to the minimum of one or lowered for that.
            let raised = sizes.iter().any(|&s| n * s < total);
            if !raised {
                for (x, s) in a.iter().zip(&sizes) {
                    let share = n as f64 * *s as f64 / total as f64;
                    prop_assert!((*x as f64 - share).abs() < 1.0 + 1e-9, "{x} vs {share}");
                }
            }
        }
    }
}
