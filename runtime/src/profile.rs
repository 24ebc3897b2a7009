//! The `TNC_PROFILE=1` report, the same for every device: the kernels of one entry point
//! by the time they took (each launch timed on its own), library products with their
//! rate, and where the time went — products against everything else — in one line.

/// The kernels of one entry point, as their launches are timed.
#[derive(Default)]
pub(crate) struct Profile<'a> {
    /// (name, launches, seconds, FLOPs where known), one line per kernel.
    lines: Vec<(&'a str, usize, f64, Option<f64>)>,
}

impl<'a> Profile<'a> {
    /// One launch of `name` took `secs`; `flops`: the arithmetic it did, where the device
    /// knows it (a library product's `2·m·n·k`).
    pub fn add(&mut self, name: &'a str, secs: f64, flops: Option<f64>) {
        match self.lines.iter_mut().find(|l| l.0 == name) {
            Some(l) => {
                l.1 += 1;
                l.2 += secs;
                l.3 = l.3.zip(flops).map(|(a, b)| a + b);
            }
            None => self.lines.push((name, 1, secs, flops)),
        }
    }

    /// The report's lines: a heading, then `  <ms> ms <share>%  <launches>× <name>` for
    /// each kernel, slowest first, with `  <rate> GFLOP/s` after a library product (the
    /// GPU check's `gemms.py compare` reads these lines), then the products' total.
    pub fn report(mut self, heading: &str) -> Vec<String> {
        self.lines.sort_by(|a, b| b.2.total_cmp(&a.2));
        let total: f64 = self.lines.iter().map(|l| l.2).sum();
        let launches: usize = self.lines.iter().map(|l| l.1).sum();
        let share = |secs: f64| 100.0 * secs / total.max(1e-12);
        let rate = |flops: f64, secs: f64| flops / secs.max(1e-12) / 1e9;
        let mut out = vec![format!("profile of `{heading}`: {:.3} ms in {launches} launches", total * 1e3)];
        for &(name, count, secs, flops) in &self.lines {
            let mut line = format!("  {:>10.3} ms {:>5.1}%  {count}× {name}", secs * 1e3, share(secs));
            if let Some(f) = flops {
                line += &format!("  {:.1} GFLOP/s", rate(f, secs));
            }
            out.push(line);
        }
        let products: Vec<_> = self.lines.iter().filter_map(|l| l.3.map(|f| (l.2, f))).collect();
        if !products.is_empty() {
            let (secs, flops) = products.iter().fold((0.0, 0.0), |(s, f), p| (s + p.0, f + p.1));
            out.push(format!(
                "  library products: {:.3} ms ({:.1}%) at {:.1} GFLOP/s; every other kernel: {:.3} ms",
                secs * 1e3,
                share(secs),
                rate(flops, secs),
                (total - secs) * 1e3
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Profile;

    #[test]
    fn lines_sum_launches_and_rate_the_products() {
        let mut p = Profile::default();
        p.add("g2_gemm", 0.002, Some(4e8));
        p.add("g5_row_0", 0.001, None);
        p.add("g2_gemm", 0.002, Some(4e8));
        let r = p.report("forward");
        assert_eq!(r[0], "profile of `forward`: 5.000 ms in 3 launches");
        assert_eq!(r[1], "       4.000 ms  80.0%  2× g2_gemm  200.0 GFLOP/s");
        assert_eq!(r[2], "       1.000 ms  20.0%  1× g5_row_0");
        assert_eq!(r[3], "  library products: 4.000 ms (80.0%) at 200.0 GFLOP/s; every other kernel: 1.000 ms");
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn without_products_there_is_no_summary() {
        let mut p = Profile::default();
        p.add("g1_row_0", 0.5, None);
        assert_eq!(
            p.report("backward"),
            ["profile of `backward`: 500.000 ms in 1 launches", "     500.000 ms 100.0%  1× g1_row_0"]
        );
    }
}
