//! The state machine of one process: a task that owns the process and reacts to commands, exits (from the
//! reaper or a pidfd), readiness results and its own timers. It never blocks: spawning, and reading its own
//! process's `/proc/<pid>/stat` and `cmdline`, are its only system calls of note (scans of all of `/proc` run on
//! the blocking pool, `scan.rs`), and waiting (backoff, stop timeout, group-empty checks) is done with timers.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::definition::{resolve_program, ProcessDefinition, RestartPolicy, ID_ENV, OWNER_ENV};
use super::error::SupervisorError;
use super::gate::{self, GateFuture};
use super::logs::LogSink;
use super::reaper::{ExitReport, ExitSender};
use super::record::{unix_now, DefinitionSummary, Desired, EventKind, ProcessEvent, ProcessRecord, ProcessState};
use super::state::Identity;
use super::{sys, Ctx};

mod exits;
mod spawn;
mod stop;

/// Reply to a command.
pub(crate) type Reply = oneshot::Sender<Result<(), SupervisorError>>;

/// Messages to a process's state machine.
pub(crate) enum ActorCmd {
    Start(Reply),
    Stop(Reply),
    Restart(Reply),
    Replace {
        def: Arc<ProcessDefinition>,
        restart: bool,
        reply: Reply,
    },
    Remove,
    Shutdown {
        stop_children: bool,
        done: oneshot::Sender<()>,
    },
}

/// How a state machine begins.
pub(crate) enum Initial {
    /// New definition: start if `autostart`.
    Fresh,
    /// A live process from the state file.
    Adopt {
        identity: Identity,
        start_time: Option<f64>,
        restarts: u32,
        desired: Desired,
    },
    /// In the state file with a pid that is gone (or reused): report EXITED, then apply the restart policy.
    Lost {
        reason: String,
        restarts: u32,
        desired: Desired,
    },
    /// In the state file without a process.
    Saved {
        state: ProcessState,
        desired: Desired,
        restarts: u32,
        last_error: Option<String>,
    },
}

type ProbeFuture = crate::util::BoxFuture<'static, bool>;

/// The process currently owned.
struct Run {
    identity: Identity,
    start_time: f64,
    started: Instant,
    /// A forking launcher that has not handed over yet.
    launcher: bool,
    /// Exit watch for a process that is not our child.
    pidfd: Option<AsyncFd<OwnedFd>>,
    /// The leader's exit, once seen while stopping.
    exit: Option<ExitReport>,
}

/// What follows a completed stop.
enum AfterStop {
    Idle,
    Start,
    Remove,
    Shutdown(oneshot::Sender<()>),
    Fail(String),
}

struct Stopping {
    kill_at: Instant,
    killed: bool,
    give_up_at: Option<Instant>,
    /// Survivors after SIGKILL were reported.
    reported: bool,
    next_poll: Option<Instant>,
    then: AfterStop,
}

/// Why a `/proc` marker scan is running (scans run on the blocking pool, never on the runtime).
enum ScanFor {
    /// A forking launcher exited 0: find the process it left behind.
    Adopt(ExitReport),
    /// A stop: find marked processes outside the recorded groups (e.g. a grandchild that called `setsid`).
    Stop,
}

/// The least time between two marker scans of one stop.
const SCAN_INTERVAL: Duration = Duration::from_millis(100);

/// Group members left behind by an exited leader: signalled, then SIGKILLed at `kill_at`.
struct Leftovers {
    groups: Vec<i32>,
    kill_at: Instant,
}

pub(crate) struct Actor {
    id: String,
    ctx: Arc<Ctx>,
    def: Arc<ProcessDefinition>,
    sink: Arc<LogSink>,
    cmds: mpsc::UnboundedReceiver<ActorCmd>,
    exit_tx: ExitSender,
    exit_rx: mpsc::UnboundedReceiver<ExitReport>,
    state: ProcessState,
    desired: Desired,
    run: Option<Run>,
    stopping: Option<Stopping>,
    leftovers: Option<Leftovers>,
    backoff_at: Option<Instant>,
    probe: Option<ProbeFuture>,
    probe_at: Option<Instant>,
    /// Waiting for dependencies / the restart hook before spawning ([`gate`]); the state is `BACKOFF`.
    gate: Option<GateFuture>,
    /// `last_error` before the gate's "waiting for" message, restored when the gate opens.
    error_before_gate: Option<Option<String>>,
    ready_deadline: Option<Instant>,
    ready: Option<bool>,
    starts: VecDeque<Instant>,
    exits: VecDeque<String>,
    next_delay: Duration,
    restarts: u32,
    last_error: Option<String>,
    last_exit: Option<ExitReport>,
    last_start_time: Option<f64>,
    adopted: bool,
    finished: bool,
    scan: Option<tokio::sync::oneshot::Receiver<Vec<sys::ProcStat>>>,
    scan_for: Option<ScanFor>,
    /// During a stop: the last marker scan found nothing left (reset whenever a scan finds survivors).
    stop_clean: bool,
    /// The next re-reading of the running process's command line, as an index into [`CMDLINE_CHECKS`].
    cmdline_check: Option<(Instant, usize)>,
}

/// When (after the spawn) the command line of a new process is read again. A wrapper that `exec`s its real
/// program changes it, and the state file must hold the new one: the next supervisor compares it before
/// re-adopting. One reading each, by the process's own state machine: reading every young process at every
/// state-file save cost 200 `/proc` reads a save while 100 processes started.
const CMDLINE_CHECKS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// The record of a process before its state machine has run.
pub(crate) fn initial_record(def: &ProcessDefinition, sink: &LogSink) -> ProcessRecord {
    ProcessRecord {
        id: def.id.clone(),
        state: ProcessState::Stopped,
        pid: None,
        pgid: None,
        start_time: None,
        uptime_s: None,
        exit_code: None,
        exit_signal: None,
        restarts: 0,
        last_error: None,
        argv: def.effective_argv(),
        cwd: def.cwd.clone(),
        env: child_env(def),
        ready: None,
        stdout_log: sink.stdout_log.clone(),
        stderr_log: sink.stderr_log.clone(),
        log_dropped_bytes: 0,
        adopted: false,
        desired: if def.autostart {
            Desired::Running
        } else {
            Desired::Stopped
        },
        definition: DefinitionSummary::of(def),
    }
}

/// The explicit environment of the child, as shown in the status.
fn child_env(def: &ProcessDefinition) -> std::collections::BTreeMap<String, String> {
    let mut env = def.effective_env();
    env.insert(ID_ENV.to_owned(), def.id.clone());
    env
}

fn describe_exit(exit: Option<ExitReport>) -> String {
    match exit {
        Some(ExitReport { code: Some(c), .. }) => format!("exited with code {c}"),
        Some(ExitReport { signal: Some(s), .. }) => {
            let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
            format!("killed by signal {s} ({name})")
        }
        _ => "exited; exit status unknown (not our child)".to_owned(),
    }
}

async fn poll_probe(probe: &mut Option<ProbeFuture>) -> bool {
    match probe {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn poll_gate(gate: &mut Option<GateFuture>) {
    match gate {
        Some(g) => g.await,
        None => std::future::pending().await,
    }
}

async fn pidfd_exited(fd: Option<&AsyncFd<OwnedFd>>) {
    match fd {
        // Readable (or an error) means the process has exited.
        Some(fd) => drop(fd.readable().await),
        None => std::future::pending().await,
    }
}

async fn poll_scan(scan: &mut Option<tokio::sync::oneshot::Receiver<Vec<sys::ProcStat>>>) -> Vec<sys::ProcStat> {
    match scan {
        Some(h) => h.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn earliest(times: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    times.into_iter().flatten().min()
}

impl Actor {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        def: Arc<ProcessDefinition>,
        sink: Arc<LogSink>,
        cmds: mpsc::UnboundedReceiver<ActorCmd>,
    ) -> Self {
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        Actor {
            id: def.id.clone(),
            next_delay: def.backoff.initial,
            desired: if def.autostart {
                Desired::Running
            } else {
                Desired::Stopped
            },
            ctx,
            def,
            sink,
            cmds,
            exit_tx,
            exit_rx,
            state: ProcessState::Stopped,
            run: None,
            stopping: None,
            leftovers: None,
            backoff_at: None,
            probe: None,
            probe_at: None,
            gate: None,
            error_before_gate: None,
            ready_deadline: None,
            ready: None,
            starts: VecDeque::new(),
            exits: VecDeque::new(),
            restarts: 0,
            last_error: None,
            last_exit: None,
            last_start_time: None,
            adopted: false,
            finished: false,
            scan: None,
            scan_for: None,
            stop_clean: false,
            cmdline_check: None,
        }
    }

    pub(crate) async fn run(mut self, initial: Initial) {
        self.init(initial);
        while !self.finished {
            let deadline = self.next_deadline();
            tokio::select! {
                Some(report) = self.exit_rx.recv() => self.on_exit(report),
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => break,
                },
                ok = poll_probe(&mut self.probe) => {
                    self.probe = None;
                    self.on_probe(ok);
                }
                () = poll_gate(&mut self.gate) => {
                    self.gate = None;
                    self.on_gate_open();
                }
                () = pidfd_exited(self.run.as_ref().and_then(|r| r.pidfd.as_ref())) => self.on_pidfd_exit(),
                found = poll_scan(&mut self.scan) => {
                    self.scan = None;
                    self.on_scan(found);
                }
                () = sleep_until_opt(deadline) => self.on_timer(),
            }
            self.forget_if_transient();
        }
        self.sink.close(false);
    }

    // ----- client definitions --------------------------------------------------------------------------------

    /// A client-created definition lives only as long as its process: once it is stopped, exited or fatal
    /// (and nothing is pending), it is removed with its FIFOs, descriptors and log tail.
    fn forget_if_transient(&mut self) {
        if self.finished
            || self.stopping.is_some()
            || !matches!(
                self.state,
                ProcessState::Stopped | ProcessState::Exited | ProcessState::Fatal
            )
        {
            return;
        }
        let transient = self
            .ctx
            .table()
            .slots
            .iter()
            .any(|s| s.record.id == self.id && s.transient && !s.removing);
        if transient {
            tracing::info!(id = %self.id, state = %self.state, last_error = ?self.last_error, "client-created process ended; definition removed");
            if let Some(slot) = self.ctx.table().slot_mut(&self.id) {
                slot.removing = true;
            }
            self.remove();
        }
    }

    // ----- marker scans ----------------------------------------------------------------------------------------

    /// Starts a `/proc` scan for processes carrying this process's marker, unless one is running.
    fn start_scan(&mut self, purpose: ScanFor) {
        if self.scan.is_some() {
            if matches!(purpose, ScanFor::Adopt(_)) {
                self.scan_for = Some(purpose);
            }
            return;
        }
        self.scan = Some(self.ctx.scans.request(&self.id));
        self.scan_for = Some(purpose);
    }

    fn on_scan(&mut self, found: Vec<sys::ProcStat>) {
        let purpose = self.scan_for.take();
        if self.stopping.is_some() {
            self.on_stop_scan(found);
            return;
        }
        if let Some(ScanFor::Adopt(launcher)) = purpose {
            let waiting = self.state == ProcessState::Starting && self.run.as_ref().is_some_and(|r| r.launcher);
            if waiting {
                self.adopt_from(launcher, found);
            }
        }
    }

    /// Signals every marked process a stop scan found (one by one: they may have left our groups), and ends
    /// the stop when nothing is left.
    fn on_stop_scan(&mut self, found: Vec<sys::ProcStat>) {
        let killed = self.stopping.as_ref().is_some_and(|s| s.killed);
        let signal = if killed { Signal::SIGKILL } else { self.def.stop_signal };
        // Members of our own groups had the group's signal and are watched through the group; counting them
        // here made a scan that ran before they died cost the stop another SCAN_INTERVAL.
        let in_our_groups = |p: &sys::ProcStat| {
            self.run
                .as_ref()
                .is_some_and(|r| r.identity.groups.contains(&p.pgrp) && r.identity.group_trusted(p.pgrp))
        };
        let survivors: Vec<i32> = found.iter().filter(|p| !in_our_groups(p)).map(|p| p.pid).collect();
        for pid in &survivors {
            let _ = sys::signal_pid(*pid, signal);
        }
        if !survivors.is_empty() {
            tracing::info!(id = %self.id, ?survivors, ?signal, "stopping marked processes outside the process group");
        }
        self.stop_clean = survivors.is_empty();
        let now = Instant::now();
        if let Some(st) = &mut self.stopping {
            st.next_poll = Some(now + SCAN_INTERVAL.max(self.ctx.config.group_poll_interval));
        }
        self.tick_stopping(now);
    }

    // ----- reporting -------------------------------------------------------------------------------------

    /// Copies the actor's view into the status table; with `old`, also emits a state event. Then asks for a
    /// state-file write.
    fn publish(&mut self, old: Option<ProcessState>, event_pid: Option<i32>, exit: Option<ExitReport>) {
        {
            let mut table = self.ctx.table();
            let Some(slot) = table.slot_mut(&self.id) else {
                return;
            };
            let r = &mut slot.record;
            r.state = self.state;
            r.pid = self.run.as_ref().map(|run| run.identity.pid);
            r.pgid = self.run.as_ref().map(|run| run.identity.pgid);
            r.start_time = self.run.as_ref().map(|run| run.start_time).or(self.last_start_time);
            r.exit_code = self.last_exit.and_then(|e| e.code);
            r.exit_signal = self.last_exit.and_then(|e| e.signal);
            r.restarts = self.restarts;
            r.last_error = self.last_error.clone();
            r.argv = match &self.run {
                Some(run) => run.identity.argv.clone(),
                None => self.def.effective_argv(),
            };
            r.cwd = self.def.cwd.clone();
            r.env = child_env(&self.def);
            r.ready = self.ready;
            r.adopted = self.adopted;
            r.desired = self.desired;
            r.definition = DefinitionSummary::of(&self.def);
            slot.def = self.def.clone();
            slot.identity = self.run.as_ref().map(|run| run.identity.clone());
            if let Some(old) = old {
                table.emit(ProcessEvent {
                    seq: 0,
                    kind: EventKind::State,
                    id: self.id.clone(),
                    old_state: old,
                    new_state: self.state,
                    pid: event_pid,
                    exit_code: exit.and_then(|e| e.code),
                    exit_signal: exit.and_then(|e| e.signal),
                    time: unix_now(),
                });
            }
        }
        self.ctx.persister.dirty();
    }

    fn set_state(&mut self, new: ProcessState, event_pid: Option<i32>, exit: Option<ExitReport>) {
        let old = self.state;
        self.state = new;
        tracing::debug!(id = %self.id, %old, %new, pid = ?event_pid, "transition");
        self.publish(Some(old), event_pid, exit);
    }

    fn run_pid(&self) -> Option<i32> {
        self.run.as_ref().map(|r| r.identity.pid)
    }

    /// Plans the re-readings of the command line of a process just spawned (see [`CMDLINE_CHECKS`]).
    fn plan_cmdline_checks(&mut self, spawned: Instant) {
        self.cmdline_check = Some((spawned + CMDLINE_CHECKS[0], 0));
    }

    /// Reads the command line again; a changed one goes to the table and the state file.
    fn check_cmdline(&mut self) {
        let Some((_, i)) = self.cmdline_check.take() else {
            return;
        };
        let Some(run) = &mut self.run else {
            return;
        };
        if let Some(next) = CMDLINE_CHECKS.get(i + 1) {
            self.cmdline_check = Some((run.started + *next, i + 1));
        }
        let id = &mut run.identity;
        if !sys::same_process(id.pid, id.start_ticks) {
            return;
        }
        match sys::cmdline(id.pid) {
            Ok(c) if !c.is_empty() && c != id.cmdline => {
                tracing::debug!(id = %self.id, cmdline = ?c, "command line changed since the spawn");
                id.cmdline = c;
                self.publish(None, None, None);
            }
            _ => {}
        }
    }

    // ----- start-up ----------------------------------------------------------------------------------------

    fn init(&mut self, initial: Initial) {
        match initial {
            Initial::Fresh => {
                if self.def.autostart {
                    self.spawn_now();
                } else {
                    self.publish(None, None, None);
                }
            }
            Initial::Adopt {
                identity,
                start_time,
                restarts,
                desired,
            } => {
                self.restarts = restarts;
                self.desired = desired;
                self.adopt(identity, start_time);
            }
            Initial::Lost {
                reason,
                restarts,
                desired,
            } => {
                self.restarts = restarts;
                self.desired = desired;
                self.report_lost(reason);
            }
            Initial::Saved {
                state,
                desired,
                restarts,
                last_error,
            } => {
                self.restarts = restarts;
                self.desired = desired;
                self.last_error = last_error;
                match state {
                    ProcessState::Fatal => self.set_state(ProcessState::Fatal, None, None),
                    _ if desired == Desired::Running => self.spawn_now(),
                    ProcessState::Exited => self.set_state(ProcessState::Exited, None, None),
                    _ => self.publish(None, None, None),
                }
            }
        }
    }

    /// A process that should be running is not: EXITED, then the restart policy (status unknown = failure).
    fn report_lost(&mut self, reason: String) {
        tracing::warn!(id = %self.id, %reason, "process lost while the supervisor was away");
        self.last_error = Some(reason);
        self.set_state(ProcessState::Exited, None, None);
        if self.desired == Desired::Running && self.def.restart != RestartPolicy::Never {
            let delay = self
                .def
                .backoff
                .jittered(self.def.backoff.initial, self.ctx.random_unit());
            self.next_delay = self.def.backoff.next(self.def.backoff.initial);
            self.backoff_at = Some(Instant::now() + delay);
            self.set_state(ProcessState::Backoff, None, None);
        }
    }

    /// Takes over a live process recorded by a previous supervisor.
    fn adopt(&mut self, identity: Identity, start_time: Option<f64>) {
        let pid = identity.pid;
        let me = std::process::id() as i32;
        // If it was re-parented to us, the reaper reports its exit (with the status); otherwise a pidfd does.
        self.ctx.reaper.claim(pid, self.exit_tx.clone());
        let ppid = sys::stat(pid).map(|s| s.ppid);
        let pidfd = if ppid == Some(me) {
            None
        } else {
            match sys::pidfd_watch(pid) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(id = %self.id, pid, error = %e, "pidfd_open failed");
                    None
                }
            }
        };
        // The route exists now; check again so an exit in between is not missed.
        if !sys::same_process(pid, identity.start_ticks) {
            self.ctx.reaper.release(pid, &self.exit_tx);
            self.report_lost(format!("pid {pid} exited while being re-adopted (exit status unknown)"));
            return;
        }
        let start_time = start_time.unwrap_or_else(unix_now);
        let age = Duration::from_secs_f64((unix_now() - start_time).max(0.0));
        tracing::info!(id = %self.id, pid, "re-adopted a running process");
        self.run = Some(Run {
            identity,
            start_time,
            started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            launcher: false,
            pidfd,
            exit: None,
        });
        self.last_start_time = Some(start_time);
        self.adopted = true;
        self.set_state(ProcessState::Running, Some(pid), None);
    }

    // ----- commands ------------------------------------------------------------------------------------------

    fn on_cmd(&mut self, cmd: ActorCmd) {
        match cmd {
            ActorCmd::Start(reply) => {
                self.op_start();
                let _ = reply.send(Ok(()));
            }
            ActorCmd::Stop(reply) => {
                self.op_stop();
                let _ = reply.send(Ok(()));
            }
            ActorCmd::Restart(reply) => {
                self.op_restart();
                let _ = reply.send(Ok(()));
            }
            ActorCmd::Replace { def, restart, reply } => {
                self.op_replace(def, restart);
                let _ = reply.send(Ok(()));
            }
            ActorCmd::Remove => self.op_remove(),
            ActorCmd::Shutdown { stop_children, done } => self.op_shutdown(stop_children, done),
        }
    }

    /// Queues `then` behind a stop in progress, unless removal or shutdown is already queued.
    fn queue_after_stop(&mut self, then: AfterStop) {
        if let Some(st) = &mut self.stopping {
            if matches!(st.then, AfterStop::Idle | AfterStop::Start | AfterStop::Fail(_)) {
                st.then = then;
            }
        }
    }

    fn op_start(&mut self) {
        self.desired = Desired::Running;
        match self.state {
            ProcessState::Starting | ProcessState::Running => self.publish(None, None, None),
            ProcessState::Stopping => {
                self.queue_after_stop(AfterStop::Start);
                self.publish(None, None, None);
            }
            ProcessState::Backoff | ProcessState::Stopped | ProcessState::Exited | ProcessState::Fatal => {
                // An operator start is a fresh start: it clears FATAL and the crash-loop history.
                self.starts.clear();
                self.next_delay = self.def.backoff.initial;
                self.last_error = None;
                self.spawn_now();
            }
        }
    }

    fn op_stop(&mut self) {
        self.desired = Desired::Stopped;
        match self.state {
            ProcessState::Starting | ProcessState::Running => self.begin_stop(AfterStop::Idle),
            ProcessState::Stopping => {
                self.queue_after_stop(AfterStop::Idle);
                self.publish(None, None, None);
            }
            ProcessState::Backoff => {
                self.backoff_at = None;
                self.clear_gate();
                self.set_state(ProcessState::Stopped, None, None);
            }
            ProcessState::Stopped | ProcessState::Exited | ProcessState::Fatal => self.publish(None, None, None),
        }
    }

    fn op_restart(&mut self) {
        self.desired = Desired::Running;
        self.starts.clear();
        match self.state {
            ProcessState::Starting | ProcessState::Running => self.begin_stop(AfterStop::Start),
            ProcessState::Stopping => {
                self.queue_after_stop(AfterStop::Start);
                self.publish(None, None, None);
            }
            _ => {
                self.next_delay = self.def.backoff.initial;
                self.last_error = None;
                self.spawn_now();
            }
        }
    }

    fn op_replace(&mut self, def: Arc<ProcessDefinition>, restart: bool) {
        let changed = *def != *self.def;
        self.def = def;
        if changed && restart && matches!(self.state, ProcessState::Starting | ProcessState::Running) {
            self.begin_stop(AfterStop::Start);
        } else {
            self.publish(None, None, None);
        }
    }

    fn op_remove(&mut self) {
        self.desired = Desired::Stopped;
        match self.state {
            ProcessState::Starting | ProcessState::Running => self.begin_stop(AfterStop::Remove),
            ProcessState::Stopping => {
                if let Some(st) = &mut self.stopping {
                    if !matches!(st.then, AfterStop::Shutdown(_)) {
                        st.then = AfterStop::Remove;
                    }
                }
            }
            _ => self.remove(),
        }
    }

    fn op_shutdown(&mut self, stop_children: bool, done: oneshot::Sender<()>) {
        if !stop_children {
            // Leave the process running for the next supervisor; the state file keeps its identity.
            if let Some(pid) = self.run_pid() {
                self.ctx.reaper.release(pid, &self.exit_tx);
            }
            self.publish(None, None, None);
            let _ = done.send(());
            self.finished = true;
            return;
        }
        if let Some(l) = self.leftovers.take() {
            for g in l.groups {
                let _ = sys::signal_group(g, Signal::SIGKILL);
            }
        }
        match self.state {
            ProcessState::Starting | ProcessState::Running => self.begin_stop(AfterStop::Shutdown(done)),
            ProcessState::Stopping => {
                if let Some(st) = &mut self.stopping {
                    st.then = AfterStop::Shutdown(done);
                }
            }
            ProcessState::Backoff => {
                self.backoff_at = None;
                self.clear_gate();
                self.set_state(ProcessState::Stopped, None, None);
                let _ = done.send(());
                self.finished = true;
            }
            _ => {
                let _ = done.send(());
                self.finished = true;
            }
        }
    }

    /// Forgets the process: FIFOs, then table row and event. The FIFOs go first so that whoever sees the row
    /// gone (a client, a test) never finds them still on disk.
    fn remove(&mut self) {
        self.sink.close(true);
        self.backoff_at = None;
        self.gate = None;
        if let Some(l) = self.leftovers.take() {
            for g in l.groups {
                let _ = sys::signal_group(g, Signal::SIGKILL);
            }
        }
        {
            let mut table = self.ctx.table();
            table.slots.retain(|s| s.record.id != self.id);
            table.emit(ProcessEvent {
                seq: 0,
                kind: EventKind::Removed,
                id: self.id.clone(),
                old_state: self.state,
                new_state: ProcessState::Stopped,
                pid: None,
                exit_code: None,
                exit_signal: None,
                time: unix_now(),
            });
        }
        self.ctx.persister.dirty();
        self.finished = true;
    }

    // ----- timers --------------------------------------------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let stop = self.stopping.as_ref().map(|st| {
            let kill = (!st.killed).then_some(st.kill_at);
            let give_up = st.give_up_at.filter(|_| !st.reported);
            earliest([kill, st.next_poll, give_up])
        });
        earliest([
            self.backoff_at,
            self.probe_at,
            stop.flatten(),
            self.leftovers.as_ref().map(|l| l.kill_at),
            self.cmdline_check.map(|(at, _)| at),
        ])
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.backoff_at.is_some_and(|t| t <= now) {
            self.backoff_at = None;
            if self.state == ProcessState::Backoff {
                self.restarts += 1;
                self.spawn_now();
            }
        }
        if self.probe_at.is_some_and(|t| t <= now) {
            self.probe_at = None;
            self.launch_probe();
        }
        if let Some(st) = &mut self.stopping {
            st.next_poll = None;
            self.tick_stopping(now);
        }
        if self.cmdline_check.is_some_and(|(at, _)| at <= now) {
            self.check_cmdline();
        }
        if self.leftovers.as_ref().is_some_and(|l| l.kill_at <= now) {
            if let Some(l) = self.leftovers.take() {
                for g in l.groups {
                    let _ = sys::signal_group(g, Signal::SIGKILL);
                }
            }
        }
    }
}
