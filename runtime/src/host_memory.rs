//! How much memory this machine can give a run, for the checks made before allocating
//! (`tnc check`, `tnc train`): a run that cannot fit is refused up front with the figure,
//! instead of failing an allocation minutes in.

/// The kernel's estimate of memory available to a new process without swapping
/// (`MemAvailable` in `/proc/meminfo`), in bytes; `None` where that is unknown.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` for people: `1.50 GiB`, `512.0 MiB`, `3.2 KiB`.
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(super::human(512), "512 B");
        assert_eq!(super::human(3 << 29), "1.50 GiB");
        assert_eq!(super::human(1 << 40), "1.00 TiB");
    }

    #[test]
    fn this_linux_machine_reports_its_available_memory() {
        let bytes = super::available_bytes().expect("/proc/meminfo has MemAvailable");
        assert!(bytes > 1 << 20, "{bytes}");
    }
}
