//! Spawning a process (once its gate opens) and waiting for it to be ready.

use super::*;

impl Actor {
    /// Spawns now, or once the [`gate`] opens (dependencies running; before a restart, the restart hook).
    pub(super) fn spawn_now(&mut self) {
        let restarting = self.last_exit.is_some() || self.restarts > 0;
        self.backoff_at = None;
        let Some(wait) = gate::gate(&self.ctx, &self.def, restarting) else {
            self.gate = None;
            self.spawn_process();
            return;
        };
        let unmet = gate::unmet(&self.ctx, &self.def);
        // Keep the error to restore, unless what is there is our own waiting message (a gate set again).
        let waiting_message = self.gate.is_some()
            && self
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("waiting for "));
        if !waiting_message || self.error_before_gate.is_none() {
            self.error_before_gate = Some(self.last_error.clone());
        }
        self.gate = Some(wait);
        if !unmet.is_empty() {
            self.last_error = Some(format!("waiting for {}", unmet.join(", ")));
            tracing::info!(id = %self.id, waiting_for = ?unmet, "start waits for its dependencies");
        }
        if self.state == ProcessState::Backoff {
            self.publish(None, None, None);
        } else {
            self.set_state(ProcessState::Backoff, None, None);
        }
    }

    pub(super) fn on_gate_open(&mut self) {
        if let Some(previous) = self.error_before_gate.take() {
            self.last_error = previous;
        }
        if self.state == ProcessState::Backoff && self.desired == Desired::Running {
            self.spawn_process();
        }
    }

    /// Drops a pending gate (stop, shutdown, removal).
    pub(super) fn clear_gate(&mut self) {
        self.gate = None;
        if let Some(previous) = self.error_before_gate.take() {
            self.last_error = previous;
        }
    }

    pub(super) fn spawn_process(&mut self) {
        if let Some(l) = self.leftovers.take() {
            // Orphans of the previous run would hold its ports: they go before the new run starts.
            for g in l.groups {
                let _ = sys::signal_group(g, Signal::SIGKILL);
            }
        }
        self.backoff_at = None;
        let def = self.def.clone();
        let argv = def.effective_argv();
        let Some((program, args)) = argv.split_first() else {
            self.after_failure(None, Duration::ZERO, Some("empty argv".to_owned()));
            return;
        };
        let program = match resolve_program(program, &def) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "spawn failed");
                self.after_failure(None, Duration::ZERO, Some(e.to_string()));
                return;
            }
        };
        let mut cmd = Command::new(&program);
        // The resolved path is what runs; the process still sees (and shows) the name it was given.
        cmd.arg0(argv[0].as_str()).args(args);
        if !def.inherit_env {
            cmd.env_clear();
        }
        cmd.envs(def.effective_env())
            .env(ID_ENV, &self.id)
            .env(OWNER_ENV, &self.ctx.owner);
        if let Some(cwd) = &def.cwd {
            cmd.current_dir(cwd);
        }
        cmd.stdin(Stdio::null()).process_group(0);
        let now = Instant::now();
        self.starts.push_back(now);
        let spawned = self.sink.child_stdio().and_then(|(out, err)| {
            cmd.stdout(out).stderr(err);
            self.ctx.reaper.spawn(&mut cmd, self.exit_tx.clone())
        });
        // Closes our copies of the child's FIFO descriptors.
        drop(cmd);
        match spawned {
            Ok(pid) => {
                let start_ticks = sys::stat(pid).map_or(0, |s| s.start_ticks);
                let cmdline = sys::cmdline(pid)
                    .ok()
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| argv.clone());
                let start_time = unix_now();
                self.run = Some(Run {
                    identity: Identity {
                        pid,
                        pgid: pid,
                        groups: vec![pid],
                        group_leaders: vec![(pid, start_ticks)],
                        start_ticks,
                        cmdline,
                        argv,
                    },
                    start_time,
                    started: now,
                    launcher: def.forking,
                    pidfd: None,
                    exit: None,
                });
                self.last_start_time = Some(start_time);
                self.plan_cmdline_checks(now);
                // `last_exit` is kept: the record shows how the previous run ended while the next one runs.
                self.ready = None;
                self.adopted = false;
                self.set_state(ProcessState::Starting, Some(pid), None);
                if !def.forking {
                    self.begin_readiness();
                }
            }
            Err(e) => {
                let msg = format!("cannot start {program:?}: {e}");
                tracing::warn!(id = %self.id, error = %msg, "spawn failed");
                self.after_failure(None, Duration::ZERO, Some(msg));
            }
        }
    }

    pub(super) fn begin_readiness(&mut self) {
        let pid = self.run_pid();
        match (&self.def.readiness, &self.ctx.probe) {
            (Some(r), Some(_)) => {
                self.ready_deadline = Some(Instant::now() + r.timeout);
                self.launch_probe();
            }
            (Some(_), None) => {
                tracing::debug!(id = %self.id, "readiness configured but no probe installed; RUNNING at once");
                self.set_state(ProcessState::Running, pid, None);
            }
            (None, _) => self.set_state(ProcessState::Running, pid, None),
        }
    }

    pub(super) fn launch_probe(&mut self) {
        let (Some(probe), Some(deadline)) = (&self.ctx.probe, self.ready_deadline) else {
            return;
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let attempt = probe.probe(&self.def);
        self.probe = Some(Box::pin(async move {
            tokio::time::timeout(remaining, attempt).await.unwrap_or(false)
        }));
    }

    pub(super) fn clear_probe(&mut self) {
        self.probe = None;
        self.probe_at = None;
        self.ready_deadline = None;
    }

    pub(super) fn on_probe(&mut self, ok: bool) {
        if self.state != ProcessState::Starting {
            return;
        }
        self.ready = Some(ok);
        let pid = self.run_pid();
        if ok {
            self.clear_probe();
            self.set_state(ProcessState::Running, pid, None);
            return;
        }
        let now = Instant::now();
        match (self.ready_deadline, &self.def.readiness) {
            (Some(deadline), Some(r)) if now < deadline => {
                self.probe_at = Some((now + r.interval).min(deadline));
                self.publish(None, None, None);
            }
            _ => {
                let timeout = self.def.readiness.as_ref().map_or(0.0, |r| r.timeout.as_secs_f64());
                let msg = format!("not ready within {timeout:.1} s; stopped");
                self.last_error = Some(msg.clone());
                self.begin_stop(AfterStop::Fail(msg));
            }
        }
    }
}
