//! Stopping: the stop signal, the timeout and SIGKILL, the whole process group and its escapees.

use super::*;

impl Actor {
    /// Sends `signal` to every group of the run. For a re-adopted process whose pid now names another
    /// process (start time differs), its group is left alone.
    pub(super) fn signal_run(&self, signal: Signal) {
        let Some(run) = &self.run else {
            return;
        };
        let id = &run.identity;
        let leader_reused = run.exit.is_none()
            && sys::stat(id.pid).is_some_and(|s| s.start_ticks != id.start_ticks && id.start_ticks != 0);
        for g in &id.groups {
            if !id.group_trusted(*g) {
                tracing::warn!(id = %self.id, pgid = g, "recorded group is not ours any more; not signalling it");
                continue;
            }
            if leader_reused && *g == id.pid {
                tracing::warn!(id = %self.id, pid = id.pid, "pid reused by another process; not signalling it");
                continue;
            }
            if let Err(e) = sys::signal_group(*g, signal) {
                tracing::warn!(id = %self.id, pgid = g, error = %e, "cannot signal the process group");
            }
        }
    }

    pub(super) fn begin_stop(&mut self, then: AfterStop) {
        self.clear_probe();
        let Some(pid) = self.run_pid() else {
            // Nothing to stop.
            let stopping = Stopping {
                kill_at: Instant::now(),
                killed: true,
                give_up_at: None,
                reported: false,
                next_poll: None,
                then,
            };
            self.stopping = Some(stopping);
            self.finish_stop();
            return;
        };
        let signal = self.def.stop_signal;
        self.signal_run(signal);
        self.stop_clean = false;
        self.start_scan(ScanFor::Stop);
        let now = Instant::now();
        let killed = signal == Signal::SIGKILL;
        self.stopping = Some(Stopping {
            kill_at: now + self.def.stop_timeout,
            killed,
            give_up_at: killed.then(|| now + self.ctx.config.kill_grace),
            reported: false,
            next_poll: None,
            then,
        });
        self.set_state(ProcessState::Stopping, Some(pid), None);
    }

    pub(super) fn tick_stopping(&mut self, now: Instant) {
        let poll = self.ctx.config.group_poll_interval;
        let grace = self.ctx.config.kill_grace;
        let (due_kill, leader_gone, launcher) = match (&self.stopping, &self.run) {
            (Some(st), Some(run)) => (!st.killed && now >= st.kill_at, run.exit.is_some(), run.launcher),
            (Some(_), None) => {
                self.finish_stop();
                return;
            }
            _ => return,
        };
        if due_kill {
            tracing::info!(id = %self.id, "stop timeout: SIGKILL to the process group");
            self.signal_run(Signal::SIGKILL);
            if let Some(st) = &mut self.stopping {
                st.killed = true;
                st.give_up_at = Some(now + grace);
            }
            // Marked processes outside the groups get their SIGKILL from the next scan.
            self.stop_clean = false;
            self.start_scan(ScanFor::Stop);
        }
        if leader_gone && launcher {
            // A launcher stopped before handing over: its detached server carries the marker; the scans of the
            // stop find it.
            if let Some(run) = self.run.as_mut() {
                run.launcher = false;
            }
        }
        let alive: Vec<i32> = self
            .run
            .as_ref()
            .map(|r| {
                r.identity
                    .groups
                    .iter()
                    .copied()
                    .filter(|g| r.identity.group_trusted(*g) && sys::group_alive(*g))
                    .collect()
            })
            .unwrap_or_default();
        if leader_gone && alive.is_empty() {
            // The groups are empty; the stop ends once a marker scan finds nothing left either.
            if self.stop_clean && self.scan.is_none() {
                self.finish_stop();
            } else if self.scan.is_none() {
                let due = self
                    .stopping
                    .as_ref()
                    .and_then(|s| s.next_poll)
                    .is_none_or(|t| t <= now);
                if due {
                    self.start_scan(ScanFor::Stop);
                }
            }
            return;
        }
        // The leader's exit is an event; only the rest of the group needs polling.
        let mut message = None;
        if let Some(st) = &mut self.stopping {
            let late = !st.reported && st.give_up_at.is_some_and(|t| now >= t);
            if late {
                st.reported = true;
                let pids: Vec<i32> = alive.iter().flat_map(|g| sys::group_members(*g)).collect();
                message = Some(format!("still stopping: processes {pids:?} survive SIGKILL"));
            }
            if leader_gone {
                st.next_poll = Some(now + if st.reported { Duration::from_secs(1) } else { poll });
            }
        }
        if let Some(m) = message {
            tracing::warn!(id = %self.id, "{m}");
            self.last_error = Some(m);
            self.publish(None, None, None);
        }
    }

    pub(super) fn finish_stop(&mut self) {
        let Some(st) = self.stopping.take() else {
            return;
        };
        self.stop_clean = false;
        let run = self.run.take();
        let exit = run.as_ref().and_then(|r| r.exit);
        if let Some(r) = &run {
            self.ctx.reaper.release(r.identity.pid, &self.exit_tx);
        }
        let pid = run.as_ref().map(|r| r.identity.pid);
        if exit.is_some() {
            self.last_exit = exit;
        }
        match st.then {
            AfterStop::Idle => self.set_state(ProcessState::Stopped, pid, exit),
            AfterStop::Start => {
                self.set_state(ProcessState::Stopped, pid, exit);
                self.next_delay = self.def.backoff.initial;
                self.spawn_now();
            }
            AfterStop::Remove => {
                self.set_state(ProcessState::Stopped, pid, exit);
                self.remove();
            }
            AfterStop::Shutdown(done) => {
                self.set_state(ProcessState::Stopped, pid, exit);
                let _ = done.send(());
                self.finished = true;
            }
            AfterStop::Fail(msg) => {
                let uptime = run.map(|r| r.started.elapsed()).unwrap_or_default();
                self.after_failure(exit, uptime, Some(msg));
            }
        }
    }
}
