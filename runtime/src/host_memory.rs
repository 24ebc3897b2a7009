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

/// This machine's memory (`MemTotal` in `/proc/meminfo`), in bytes; `None` where that is
/// unknown. For warnings about sizes that can never fit, not for checks before allocating.
pub fn total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// An error naming `what` when this process cannot be given `bytes` more: the allocator is
/// asked for them (and they are returned untouched), so the answer is the one the real
/// allocation would get, not a guess from `MemAvailable` (which on some VMs starts small
/// and grows as memory is used). A request past it would otherwise abort the process.
pub fn check_fits(bytes: u128, what: &str) -> Result<(), String> {
    let granted = usize::try_from(bytes).is_ok_and(|b| Vec::<u8>::new().try_reserve_exact(b).is_ok());
    if granted {
        return Ok(());
    }
    let available = available_bytes().map(|b| format!(" ({} available)", human(b as u128))).unwrap_or_default();
    Err(format!("{what} need {}, more memory than this machine can give{available}", human(bytes)))
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
    fn what_cannot_fit_is_named_with_both_figures() {
        assert_eq!(super::check_fits(1 << 20, "the inputs"), Ok(()));
        let err = super::check_fits(1 << 60, "the inputs").unwrap_err();
        assert!(err.starts_with("the inputs need 1024.00 PiB, more memory than this machine can give"), "{err}");
        // Past the address space's 2^47 bytes, whatever the machine has.
        assert!(super::check_fits(1 << 50, "the inputs").is_err());
    }

    #[test]
    fn this_linux_machine_reports_its_available_memory() {
        let bytes = super::available_bytes().expect("/proc/meminfo has MemAvailable");
        assert!(bytes > 1 << 20, "{bytes}");
    }
}
