//! The standard `process_*` metrics, read from `/proc/self` at scrape time (Linux; elsewhere
//! none are reported), named as Prometheus's own client libraries name them.

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The kernel reports CPU times and the start time in USER_HZ ticks, which is 100 on every
/// Linux architecture keygate builds for (sysconf would need unsafe FFI for a constant);
/// Prometheus's procfs library makes the same assumption.
const USER_HZ: f64 = 100.0;

/// One reading of the process's counters; `None` for what could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl Sample {
    /// Reads `/proc/self` now. Each value is read on its own, so one unreadable file costs
    /// only its own metrics.
    pub fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(StatFields::parse);
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s));
        Self {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
            resident_memory_bytes: status.as_deref().and_then(|s| status_kib(s, "VmRSS:")).map(|k| k * 1024),
            virtual_memory_bytes: status.as_deref().and_then(|s| status_kib(s, "VmSize:")).map(|k| k * 1024),
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| max_open_files(&s)),
            start_time_seconds: match (stat, boot_time) {
                (Some(stat), Some(boot)) => Some(boot as f64 + stat.starttime as f64 / USER_HZ),
                _ => None,
            },
        }
    }

    /// Adds the metrics read to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        if let Some(v) = self.cpu_seconds {
            registry.register(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                ConstCounter::new(v),
            );
        }
        let gauges = [
            ("process_resident_memory_bytes", "Resident memory size in bytes", self.resident_memory_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", self.virtual_memory_bytes),
            ("process_open_fds", "Number of open file descriptors", self.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", self.max_fds),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                registry.register(name, help, ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)));
            }
        }
        if let Some(v) = self.start_time_seconds {
            registry.register(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                ConstGauge::new(v),
            );
        }
    }
}

/// The fields of `/proc/self/stat` used here (proc(5): utime 14, stime 15, starttime 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    utime: u64,
    stime: u64,
    starttime: u64,
}

impl StatFields {
    fn parse(text: &str) -> Option<Self> {
        // The command name (field 2) is in parentheses and may itself hold spaces or ')'; the
        // fields after the last ')' start at field 3.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self { utime: field(14)?, stime: field(15)?, starttime: field(22)? })
    }
}

/// A `Name:   1234 kB` line of `/proc/self/status`, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_ascii_whitespace().next()?.parse().ok()
}

/// `btime` of `/proc/stat`: when the machine booted, in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (key gate) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 3 0 12345 \
                    104857600 2560 18446744073709551615";
        assert_eq!(StatFields::parse(stat), Some(StatFields { utime: 250, stime: 50, starttime: 12345 }));
        assert_eq!(StatFields::parse("garbage"), None);
        assert_eq!(
            status_kib("Name:\tkeygate\nVmSize:\t  204800 kB\nVmRSS:\t   10240 kB\n", "VmRSS:"),
            Some(10240)
        );
        assert_eq!(boot_time("cpu  1 2 3\nbtime 1764400000\nprocesses 9\n"), Some(1_764_400_000));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_plausibly() {
        let sample = Sample::read();
        assert!(sample.cpu_seconds.is_some_and(|c| c >= 0.0), "{sample:?}");
        assert!(sample.resident_memory_bytes.is_some_and(|r| r > 1 << 20), "{sample:?}");
        assert!(sample.virtual_memory_bytes >= sample.resident_memory_bytes, "{sample:?}");
        assert!(sample.open_fds.is_some_and(|n| n >= 3), "{sample:?}");
        assert!(sample.max_fds >= sample.open_fds, "{sample:?}");
        assert!(sample.start_time_seconds.is_some_and(|t| t > 1.6e9), "{sample:?}");
    }
}
