//! CPU and memory of a managed process, read from `/proc` on the machine the CLI runs on.
//!
//! `list_processes` carries no CPU or RSS figures, so `pm_cs ps` reads them itself. It only trusts a pid
//! whose age matches the record's uptime, so a remote daemon or a reused pid shows `-`, never another
//! process's figures.

use nix::unistd::{sysconf, SysconfVar};

/// Average CPU use since start (percent of one core) and resident memory (bytes) of `pid`, if it is the
/// process that has been up `uptime_s` seconds (within two seconds).
pub fn cpu_and_rss(pid: i64, uptime_s: f64) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let since_boot: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let tck = sysconf(SysconfVar::CLK_TCK).ok()??.max(1) as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok()??.max(1) as u64;
    let f = StatFields::parse(&stat)?;
    let age = since_boot - f.start_ticks as f64 / tck;
    if !(age - uptime_s).abs().lt(&2.0) {
        return None;
    }
    let cpu = if age > 0.0 {
        (f.utime + f.stime) as f64 / tck / age * 100.0
    } else {
        0.0
    };
    Some(((cpu * 10.0).round() / 10.0, f.rss_pages * page))
}

/// Fields 14, 15, 22 and 24 of `/proc/<pid>/stat`.
#[derive(Debug, PartialEq)]
struct StatFields {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    rss_pages: u64,
}

impl StatFields {
    /// Counted from the last `)`, since the command name may contain spaces and parentheses.
    fn parse(text: &str) -> Option<StatFields> {
        let rest: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
        Some(StatFields {
            utime: field(14)?,
            stime: field(15)?,
            start_ticks: field(22)?,
            rss_pages: field(24)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_after_the_name() {
        let text =
            "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 1 0 12345 1000000 300 18446744073709551615";
        assert_eq!(
            StatFields::parse(text),
            Some(StatFields {
                utime: 150,
                stime: 50,
                start_ticks: 12345,
                rss_pages: 300
            })
        );
        assert_eq!(StatFields::parse("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_found_and_a_wrong_age_is_refused() {
        let pid = i64::from(std::process::id());
        let since_boot: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let tck = sysconf(SysconfVar::CLK_TCK).unwrap().unwrap() as f64;
        let age = since_boot - StatFields::parse(&stat).unwrap().start_ticks as f64 / tck;
        let (cpu, rss) = cpu_and_rss(pid, age).expect("our own figures");
        assert!(cpu >= 0.0 && rss > 0);
        assert_eq!(cpu_and_rss(pid, age + 3600.0), None);
    }
}
