//! What a fleet run measures: latency histograms per flow, errors by reason, completions per
//! second, and a process's resident memory.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Latencies of one flow; percentiles by sorting (a run holds at most a few 100,000).
#[derive(Debug, Clone, Default)]
pub struct Hist {
    samples: Vec<Duration>,
    sorted: bool,
}

impl Hist {
    pub fn add(&mut self, d: Duration) {
        self.samples.push(d);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn merge(&mut self, other: &Hist) {
        self.samples.extend_from_slice(&other.samples);
        self.sorted = false;
    }

    /// The `q` quantile (0.0 to 1.0), nearest rank.
    pub fn quantile(&mut self, q: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        let i = ((self.samples.len() as f64 * q).ceil() as usize).saturating_sub(1);
        self.samples[i.min(self.samples.len() - 1)]
    }

    pub fn p50(&mut self) -> Duration {
        self.quantile(0.50)
    }

    /// `n=… p50=… p99=… p99.9=…` in milliseconds.
    pub fn summary(&mut self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "n={:<7} p50={:>8.2} ms  p99={:>8.2} ms  p99.9={:>8.2} ms",
            self.len(),
            ms(self.quantile(0.50)),
            ms(self.quantile(0.99)),
            ms(self.quantile(0.999)),
        )
    }
}

/// The flows of a purchase, timed at the box: the three exchanges and the whole.
#[derive(Debug, Clone, Default)]
pub struct Flows {
    pub offer: Hist,
    pub draw: Hist,
    pub debit_response: Hist,
    pub purchase: Hist,
}

impl Flows {
    pub fn merge(&mut self, o: &Flows) {
        self.offer.merge(&o.offer);
        self.draw.merge(&o.draw);
        self.debit_response.merge(&o.debit_response);
        self.purchase.merge(&o.purchase);
    }

    pub fn print(&mut self, indent: &str) {
        println!("{indent}offer           {}", self.offer.summary());
        println!("{indent}draw            {}", self.draw.summary());
        println!("{indent}debit response  {}", self.debit_response.summary());
        println!("{indent}whole purchase  {}", self.purchase.summary());
    }
}

/// Errors counted by reason (the reason with transaction ids and numbers taken out, so one
/// cause is one line).
#[derive(Debug, Clone, Default)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, reason: &str) {
        *self.0.entry(normalise(reason)).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn merge(&mut self, o: &Errors) {
        for (k, v) in &o.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                write!(f, "; ")?;
            }
            first = false;
            write!(f, "{v} × {k}")?;
        }
        Ok(())
    }
}

/// Digits and hex runs (transaction ids, amounts, addresses) become `#`, and the text is
/// cut at 120 characters.
fn normalise(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut in_num = false;
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !in_num {
                out.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out.chars().take(120).collect()
}

/// VmRSS of a process in KiB, from /proc/<pid>/status.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Completions per second over a run: how steady the rate was.
#[derive(Debug, Clone, Default)]
pub struct PerSecond(pub Vec<u64>);

impl PerSecond {
    pub fn add(&mut self, second: usize) {
        if self.0.len() <= second {
            self.0.resize(second + 1, 0);
        }
        self.0[second] += 1;
    }

    /// (min, median, max) over whole seconds.
    pub fn spread(&self) -> (u64, u64, u64) {
        if self.0.is_empty() {
            return (0, 0, 0);
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }

    /// Seconds that reached at least `target`.
    pub fn seconds_at_least(&self, target: f64) -> usize {
        self.0.iter().filter(|&&n| n as f64 >= target).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_reasons() {
        let mut h = Hist::default();
        for i in 1..=1000u64 {
            h.add(Duration::from_millis(i));
        }
        assert_eq!(h.p50(), Duration::from_millis(500));
        assert_eq!(h.quantile(0.99), Duration::from_millis(990));
        assert_eq!(h.quantile(0.999), Duration::from_millis(999));
        let mut e = Errors::default();
        e.add("no transaction T-00012 at 127.0.0.1:4433");
        e.add("no transaction T-00999 at 127.0.0.1:4433");
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.total(), 2);
    }
}
