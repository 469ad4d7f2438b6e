//! Benchmarks. Each binary measures the thing and its peer in the same run,
//! interleaved, and prints ratios: on these noisy machines only numbers taken
//! side by side mean anything.

use std::time::Duration;

/// Median, min and max of a set of samples.
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    (med, *v.first().unwrap_or(&0.0), *v.last().unwrap_or(&0.0))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
