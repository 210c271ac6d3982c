//! What an exit means: a launcher that handed over, a crash to restart after backoff, a crash loop.

use super::*;

impl Actor {
    pub(super) fn on_pidfd_exit(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        run.pidfd = None;
        let pid = run.identity.pid;
        self.on_exit(ExitReport {
            pid,
            code: None,
            signal: None,
        });
    }

    pub(super) fn on_exit(&mut self, report: ExitReport) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.identity.pid != report.pid || run.exit.is_some() {
            return;
        }
        if self.stopping.is_some() {
            run.exit = Some(report);
            self.last_exit = Some(report);
            self.tick_stopping(Instant::now());
            return;
        }
        match self.state {
            ProcessState::Starting if run.launcher && report.code == Some(0) => {
                run.exit = Some(report);
                self.start_scan(ScanFor::Adopt(report));
            }
            ProcessState::Starting | ProcessState::Running => self.on_unexpected_exit(report, None),
            _ => {}
        }
    }

    pub(super) fn on_unexpected_exit(&mut self, report: ExitReport, reason: Option<String>) {
        let Some(run) = self.run.take() else {
            return;
        };
        self.clear_probe();
        self.ctx.reaper.release(run.identity.pid, &self.exit_tx);
        let uptime = run.started.elapsed();
        self.clean_leftovers(&run);
        self.last_exit = Some(report);
        self.after_failure(Some(report), uptime, reason);
    }

    /// Group members that outlived their leader get the stop signal now and SIGKILL after the stop timeout.
    pub(super) fn clean_leftovers(&mut self, run: &Run) {
        let groups: Vec<i32> = run
            .identity
            .groups
            .iter()
            .copied()
            .filter(|g| run.identity.group_trusted(*g) && sys::group_alive(*g))
            .collect();
        if groups.is_empty() {
            return;
        }
        tracing::info!(id = %self.id, ?groups, "leader exited; stopping what is left of its process group");
        for g in &groups {
            let _ = sys::signal_group(*g, self.def.stop_signal);
        }
        self.leftovers = Some(Leftovers {
            groups,
            kill_at: Instant::now() + self.def.stop_timeout,
        });
    }

    /// Decides what follows an exit that nobody asked for (or a failed start): EXITED, BACKOFF or FATAL.
    pub(super) fn after_failure(&mut self, exit: Option<ExitReport>, uptime: Duration, reason: Option<String>) {
        let success = reason.is_none() && exit.is_some_and(|e| e.code == Some(0));
        let desc = reason.unwrap_or_else(|| describe_exit(exit));
        self.exits.push_back(desc.clone());
        while self.exits.len() > 5 {
            self.exits.pop_front();
        }
        let backoff = self.def.backoff.clone();
        if uptime >= backoff.reset_after {
            self.next_delay = backoff.initial;
        }
        self.last_error = (!success).then(|| desc.clone());
        let pid = exit.map(|e| e.pid);
        let restart = self.desired == Desired::Running
            && match self.def.restart {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => !success,
                RestartPolicy::Always => true,
            };
        if !restart {
            self.set_state(ProcessState::Exited, pid, exit);
            return;
        }
        let now = Instant::now();
        let window = self.def.crash_loop.window;
        while self.starts.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.starts.pop_front();
        }
        let max = self.def.crash_loop.max_starts as usize;
        if max > 0 && self.starts.len() >= max {
            let exits: Vec<&str> = self.exits.iter().map(String::as_str).collect();
            let mut msg = format!(
                "crash loop: {} starts within {:.0} s; last exits: {}",
                self.starts.len(),
                window.as_secs_f64(),
                exits.join("; ")
            );
            if let Some(line) = self.sink.tail(1).pop() {
                msg.push_str(&format!("; last output: {line}"));
            }
            tracing::warn!(id = %self.id, %msg, "giving up");
            self.last_error = Some(msg);
            self.set_state(ProcessState::Fatal, pid, exit);
            return;
        }
        let delay = backoff.jittered(self.next_delay, self.ctx.random_unit());
        self.next_delay = backoff.next(self.next_delay);
        self.backoff_at = Some(now + delay);
        self.set_state(ProcessState::Backoff, pid, exit);
    }

    /// A forking launcher exited 0 and the marker scan came back: adopt the oldest process that carries our
    /// marker, was re-parented to us, started after the launcher, is in a group of its own (not ours) and
    /// that no state machine owns. Every fact is checked again after the pid is claimed, because the scan is
    /// a snapshot: a process seen before its `exec` still has our group and our environment, and one seen
    /// alive may have exited and been reaped since.
    pub(super) fn adopt_from(&mut self, launcher: ExitReport, found: Vec<sys::ProcStat>) {
        let me = std::process::id() as i32;
        let Some(run) = self.run.as_ref() else {
            return;
        };
        let since = run.identity.start_ticks;
        let launcher_pgid = run.identity.pgid;
        let mut candidates: Vec<sys::ProcStat> = found
            .into_iter()
            .filter(|p| p.ppid == me && p.start_ticks >= since && !sys::is_protected_group(p.pgrp))
            .collect();
        candidates.sort_by_key(|p| (p.start_ticks, p.pid));
        let mut chosen = None;
        for p in &candidates {
            if self.ctx.reaper.is_routed(p.pid) || !self.ctx.reaper.claim(p.pid, self.exit_tx.clone()) {
                continue;
            }
            // Claimed: an exit from now on reaches us. Is it still the process the scan saw, and ours?
            let fresh = sys::stat(p.pid).filter(|s| {
                s.start_ticks == p.start_ticks && s.state != 'Z' && s.ppid == me && !sys::is_protected_group(s.pgrp)
            });
            let marked = fresh.is_some() && sys::carries_marker(p.pid, ID_ENV, &self.id, OWNER_ENV, &self.ctx.owner);
            match fresh {
                Some(s) if marked => {
                    chosen = Some(s);
                    break;
                }
                _ => self.ctx.reaper.release(p.pid, &self.exit_tx),
            }
        }
        let Some(main) = chosen else {
            self.on_unexpected_exit(
                launcher,
                Some("forking launcher exited 0 but left no process carrying its marker to adopt".to_owned()),
            );
            return;
        };
        let cmdline = sys::cmdline(main.pid).unwrap_or_default();
        let mut identity = Identity {
            pid: main.pid,
            pgid: main.pgrp,
            groups: Vec::new(),
            group_leaders: Vec::new(),
            start_ticks: main.start_ticks,
            argv: cmdline.clone(),
            cmdline,
        };
        if let Some(run) = self.run.as_ref() {
            // The launcher's group keeps its recorded leader identity.
            identity.groups.extend(run.identity.groups.iter().copied());
            identity
                .group_leaders
                .extend(run.identity.group_leaders.iter().copied());
        }
        identity.add_group(launcher_pgid);
        identity.add_group(main.pgrp);
        for p in &candidates {
            if let Some(s) = sys::stat(p.pid).filter(|s| s.start_ticks == p.start_ticks) {
                identity.add_group(s.pgrp);
            }
        }
        if let Some(run) = self.run.as_mut() {
            run.identity = identity;
            run.launcher = false;
            run.exit = None;
        }
        tracing::info!(id = %self.id, launcher = launcher.pid, pid = main.pid, "adopted the launcher's process");
        self.begin_readiness();
    }
}
