//! The process supervisor: owns the control servers it starts, restarts them under a policy, stops whole
//! process trees, captures their output, and finds them again after its own restart.
//!
//! # Design
//!
//! * **One state machine per process** ([`actor`]): a tokio task that owns the process and receives commands
//!   as messages. Commands on different processes never wait on each other; a slow stop of one process does
//!   not delay anything else. Status reads ([`SupervisorHandle::list`], [`SupervisorHandle::get`]) come from a
//!   snapshot table that every transition updates under a short lock, never from the tasks.
//! * **Children** are spawned with `std::process::Command` (argv only, never a shell), each as the leader of
//!   its own process group, stdin from `/dev/null`, stdout/stderr into per-process FIFOs ([`logs`]).
//!   Stopping sends `stop_signal` to the whole group, waits `stop_timeout`, SIGKILLs the group, and reports
//!   `STOPPED` only once `kill(-pgid, 0)` says the group is empty — grandchildren included.
//! * **Reaping** ([`reaper`]): the process becomes a child subreaper and ONE reaper thread turns SIGCHLD into
//!   `waitpid(-1, WNOHANG)` loops, routing each managed pid's exit to its state machine at once (event driven,
//!   no polling) and reaping orphaned grandchildren. **Because of this, nothing else in the process may use
//!   `tokio::process`, `std::process::Child::wait`, `Command::status` or `Command::output`**: the reaper would
//!   collect their children's exit status first (they would see `ECHILD`).
//! * **Crash handling**: exponential backoff with jitter (Pebble model), crash-loop detection → `FATAL`
//!   (cleared only by an operator start); operator stops never count as failures.
//! * **Legacy forking launchers** (`forking: true`, e.g. `cgse puna start`): the launcher exits 0 after
//!   starting the real control server detached. Being the subreaper, we inherit that server; when the launcher
//!   exits 0 we scan `/proc` (on the blocking pool) for processes whose parent is now us, that no state machine
//!   owns, that started after the launcher, that are not in our own group and that carry our markers
//!   (`PROCMAN_ID=<id>`, `PROCMAN_SUPERVISOR=<state dir>`, inherited from the launcher), and adopt the oldest
//!   once its pid is claimed and every fact re-checked, keeping every group involved for the stop. Limits: a
//!   server that clears its environment is not adopted; one that double-forks through an intermediate which
//!   does not exit is not found.
//! * **Never ourselves** ([`sys::signal_group`]): the daemon's own group, pid and session are never
//!   signalled; recorded groups keep their leader's start time and are dropped once it names another
//!   process; a stop also signals every marked process outside the groups (e.g. after `setsid()`).
//! * **Client definitions** ([`SupervisorHandle::define_client`]) are capped and removed when their process
//!   ends (docs/security-supervisor.md).
//! * **Persistence** ([`state`]): every transition rewrites `<state_dir>/supervisor.json` atomically. A new
//!   supervisor re-adopts processes whose pid, start time and command line all match and watches them with
//!   the reaper (if they were re-parented to us) or a `pidfd` (otherwise; exit status then unknown).
//! * **Events**: every state change is sent on the caller's channel with a per-supervisor sequence number
//!   (`try_send`: a full channel drops the event, the gap in `seq` tells the subscriber, and the drop is
//!   counted). `list()` returns the current `seq`, so a client can snapshot and then follow.

pub mod actor;
pub mod definition;
pub mod error;
pub mod gate;
pub mod graph;
pub mod helper;
pub mod logs;
pub mod readiness;
pub mod reaper;
pub mod record;
mod scan;
pub mod state;
pub mod sys;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use definition::{
    class_path, resolve_program, validate_cgse_cmd, validate_client_arg, validate_client_id, Backoff, CrashLoop,
    DeviceSpec, Launchers, PingTarget, ProcessDefinition, ProcessTable, Readiness, RestartPolicy, DEFAULT_PYTHON,
    ID_ENV, OWNER_ENV,
};
pub use error::{ClientCommandError, DefinitionError, ReaperError, SupervisorError};
pub use gate::{RestartHook, RESTART_HOOK_BOUND};
pub use graph::{DependencyGraph, GraphError};
pub use logs::LogConfig;
pub use record::{Change, DefinitionSummary, Desired, EventKind, Plan, ProcessEvent, ProcessRecord, ProcessState};
pub use state::STATE_FILE;

use actor::{ActorCmd, Initial};
use logs::LogSink;
use record::unix_now;
use state::{Identity, Persister, Recognized, SavedProcess, StateFile};

/// Checks whether a process is ready; the daemon plugs in a ZeroMQ `Ping` of the control server.
pub trait ReadinessProbe: Send + Sync {
    /// One attempt: true when the process answered. The supervisor applies the definition's timeout.
    fn probe(&self, def: &ProcessDefinition) -> crate::util::BoxFuture<'static, bool>;
}

/// Where the supervisor keeps its files, and how it captures output.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// `supervisor.json` and the `fifo/` directory.
    pub state_dir: PathBuf,
    /// Log files.
    pub log_dir: PathBuf,
    /// Log capture settings.
    pub log: LogConfig,
    /// While stopping, how often to check that the process group is empty once the leader is gone.
    pub group_poll_interval: Duration,
    /// After SIGKILL, how long before reporting survivors in `last_error` (the stop keeps waiting).
    pub kill_grace: Duration,
    /// Most client-created definitions ([`SupervisorHandle::define_client`]) at a time.
    pub max_client_processes: usize,
}

impl SupervisorConfig {
    /// Defaults for everything but the two directories.
    pub fn new(state_dir: impl Into<PathBuf>, log_dir: impl Into<PathBuf>) -> Self {
        SupervisorConfig {
            state_dir: state_dir.into(),
            log_dir: log_dir.into(),
            log: LogConfig::default(),
            group_poll_interval: Duration::from_millis(5),
            kill_grace: Duration::from_secs(5),
            max_client_processes: 64,
        }
    }
}

/// Makes this process a child subreaper and starts the reaper thread. [`Supervisor::spawn`] does it too; call
/// it early in `main` so orphans are collected even before the first supervisor exists.
///
/// # Errors
/// [`SupervisorError::Reaper`] when `prctl` or the thread fails.
pub fn install_reaper() -> Result<(), SupervisorError> {
    reaper::global().map(|_| ())
}

/// One row of the status table.
pub(crate) struct Slot {
    pub record: ProcessRecord,
    pub def: Arc<ProcessDefinition>,
    pub identity: Option<Identity>,
    pub sink: Arc<LogSink>,
    pub tx: mpsc::UnboundedSender<ActorCmd>,
    pub removing: bool,
    /// Created by a client: removed when its process ends, counted against the cap.
    pub transient: bool,
}

/// The snapshot table and the event sequence, under one lock so that `list()` and the event stream agree.
pub(crate) struct Table {
    pub slots: Vec<Slot>,
    pub seq: u64,
    pub dropped_events: u64,
    pub events: mpsc::Sender<ProcessEvent>,
    /// The last event's `seq`, for waits on other processes' states ([`gate`]).
    pub changed: watch::Sender<u64>,
}

impl Table {
    pub(crate) fn slot_mut(&mut self, id: &str) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.record.id == id)
    }

    /// Assigns the next sequence number and sends; a full or closed channel drops and counts.
    pub(crate) fn emit(&mut self, mut event: ProcessEvent) {
        self.seq += 1;
        event.seq = self.seq;
        if self.events.try_send(event).is_err() {
            self.dropped_events += 1;
        }
        self.changed.send_replace(self.seq);
    }
}

/// State shared by the handle, the actors and the state writer.
pub(crate) struct Ctx {
    pub config: SupervisorConfig,
    pub table: Mutex<Table>,
    pub reaper: &'static reaper::Reaper,
    pub probe: Option<Arc<dyn ReadinessProbe>>,
    pub restart_hook: OnceLock<Arc<dyn RestartHook>>,
    pub persister: Arc<Persister>,
    pub fifo_dir: PathBuf,
    /// The value of [`OWNER_ENV`] in every child: this supervisor's state directory. With [`ID_ENV`] it marks
    /// our processes, and only ours, for the `/proc` scans (another daemon's have another directory).
    pub owner: String,
    /// The `/proc` marker scans of every process, walked together.
    pub(crate) scans: Arc<scan::MarkerScans>,
    rng: Mutex<u64>,
    closing: AtomicBool,
    apply_lock: tokio::sync::Mutex<()>,
    stop_writer: CancellationToken,
}

impl Ctx {
    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A uniform sample in [0, 1) for backoff jitter (xorshift; quality is irrelevant here).
    pub(crate) fn random_unit(&self) -> f64 {
        let mut s = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        let mut x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *s = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The state file contents for the current table; `fresh` re-reads the command lines.
    fn snapshot(&self, fresh: bool) -> Vec<u8> {
        let mut processes: Vec<SavedProcess> = {
            let table = self.table();
            table
                .slots
                .iter()
                .map(|s| SavedProcess {
                    transient: s.transient,
                    definition: (*s.def).clone(),
                    desired: s.record.desired,
                    state: s.record.state,
                    process: s.identity.clone(),
                    start_time: s.record.start_time,
                    restarts: s.record.restarts,
                    last_error: s.record.last_error.clone(),
                })
                .collect()
        };
        // Outside the lock: `/proc` reads must not delay `list()`. Each state machine re-reads its new
        // process's command line after the spawn (a wrapper may `exec`); a flush reads them all once more,
        // for an `exec` newer than that.
        if fresh {
            for p in &mut processes {
                p.process = p.process.take().map(refresh_cmdline);
            }
        }
        let file = StateFile {
            version: state::STATE_VERSION,
            supervisor_pid: std::process::id() as i32,
            saved_at: unix_now(),
            processes,
        };
        serde_json::to_vec_pretty(&file).unwrap_or_default()
    }

    /// Creates the log capture, the table row and the state machine of one process.
    fn add_process(
        self: &Arc<Self>,
        def: ProcessDefinition,
        initial: Initial,
        transient: bool,
    ) -> Result<(), SupervisorError> {
        let stem = logs::file_stem(&def.id);
        let sink = Arc::new(LogSink::open(
            &stem,
            &self.fifo_dir,
            &self.config.log_dir,
            &self.config.log,
        )?);
        let def = Arc::new(def);
        let (tx, rx) = mpsc::unbounded_channel();
        let record = actor::initial_record(&def, &sink);
        self.table().slots.push(Slot {
            record,
            def: def.clone(),
            identity: None,
            sink: sink.clone(),
            tx,
            removing: false,
            transient,
        });
        let actor = actor::Actor::new(self.clone(), def, sink, rx);
        tokio::spawn(actor.run(initial));
        Ok(())
    }
}

/// Entry point: [`Supervisor::spawn`].
pub struct Supervisor;

impl Supervisor {
    /// Starts a supervisor for `definitions`, re-adopting live processes recorded in the state directory.
    /// Must be called inside a tokio runtime. Processes with `autostart` (and those the state file says should
    /// run) are started; events go to `events`.
    ///
    /// # Errors
    /// Invalid or duplicate definitions, directories that cannot be created, or a reaper that cannot be
    /// installed.
    pub fn spawn(
        config: SupervisorConfig,
        definitions: Vec<ProcessDefinition>,
        events: mpsc::Sender<ProcessEvent>,
        readiness: Option<Arc<dyn ReadinessProbe>>,
    ) -> Result<SupervisorHandle, SupervisorError> {
        tokio::runtime::Handle::try_current().map_err(|_| SupervisorError::NoRuntime)?;
        check_unique(&definitions)?;
        let reaper = reaper::global()?;
        let fifo_dir = config.state_dir.join("fifo");
        for dir in [&config.state_dir, &fifo_dir, &config.log_dir] {
            std::fs::create_dir_all(dir).map_err(|e| SupervisorError::io(format!("creating {}", dir.display()), e))?;
        }
        let state_path = config.state_dir.join(STATE_FILE);
        let saved = match state::load(&state_path) {
            Ok(s) => s.map(|s| s.processes).unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "ignoring the unreadable state file; nothing will be re-adopted");
                Vec::new()
            }
        };

        let owner = std::fs::canonicalize(&config.state_dir)
            .unwrap_or_else(|_| config.state_dir.clone())
            .display()
            .to_string();
        // What each process starts as: adopted, lost, restored, or fresh.
        let mut plan: Vec<(ProcessDefinition, Initial, bool)> = Vec::new();
        let wanted: HashSet<&str> = definitions.iter().map(|d| d.id.as_str()).collect();
        for def in &definitions {
            let initial = match saved.iter().find(|s| s.definition.id == def.id) {
                Some(s) => recover(s, &owner),
                None => Initial::Fresh,
            };
            plan.push((def.clone(), initial, false));
        }
        // Processes defined only in the state file (Setup devices, client-created ones) are kept: re-adopted
        // when alive, else reported EXITED and restarted per their desired state and policy. A client-created
        // definition lives only as long as its process: kept only when re-adopted, and within the cap.
        let mut clients = 0usize;
        for s in saved.iter().filter(|s| !wanted.contains(s.definition.id.as_str())) {
            let initial = recover(s, &owner);
            if s.transient {
                if !matches!(initial, Initial::Adopt { .. }) || clients >= config.max_client_processes {
                    tracing::info!(id = %s.definition.id, "forgetting a client-created definition whose process is gone");
                    continue;
                }
                clients += 1;
            }
            plan.push((s.definition.clone(), initial, s.transient));
        }

        let seed = (unix_now().to_bits() ^ u64::from(std::process::id()).rotate_left(32)) | 1;
        let ctx = Arc::new(Ctx {
            config,
            table: Mutex::new(Table {
                slots: Vec::new(),
                seq: 0,
                dropped_events: 0,
                events,
                changed: watch::channel(0).0,
            }),
            reaper,
            probe: readiness,
            restart_hook: OnceLock::new(),
            persister: Persister::new(state_path),
            fifo_dir,
            scans: scan::MarkerScans::new(ID_ENV, OWNER_ENV, owner.clone()),
            owner,
            rng: Mutex::new(seed),
            closing: AtomicBool::new(false),
            apply_lock: tokio::sync::Mutex::new(()),
            stop_writer: CancellationToken::new(),
        });
        let writer_ctx = ctx.clone();
        tokio::spawn(
            ctx.persister
                .clone()
                .run(move |fresh| writer_ctx.snapshot(fresh), ctx.stop_writer.clone()),
        );
        for (def, initial, transient) in plan {
            ctx.add_process(def, initial, transient)?;
        }
        ctx.persister.dirty();
        Ok(SupervisorHandle { ctx })
    }
}

/// Re-reads the command line of a live process before saving it: a wrapper that `exec`s its real program
/// after the spawn changes it, and a stale one would make the next supervisor refuse to re-adopt.
fn refresh_cmdline(mut id: Identity) -> Identity {
    if sys::same_process(id.pid, id.start_ticks) {
        if let Ok(c) = sys::cmdline(id.pid) {
            if !c.is_empty() {
                id.cmdline = c;
            }
        }
    }
    id
}

fn check_unique(defs: &[ProcessDefinition]) -> Result<(), SupervisorError> {
    let mut ids = HashSet::new();
    let mut stems = HashSet::new();
    for d in defs {
        d.validate()?;
        if !ids.insert(d.id.as_str()) || !stems.insert(logs::file_stem(&d.id)) {
            return Err(SupervisorError::Duplicate(d.id.clone()));
        }
    }
    Ok(())
}

/// Decides how a saved process comes back. Only a process that carries our marker for its id is adopted,
/// and only with the groups that match it (see [`Identity::verify_groups`]).
fn recover(s: &SavedProcess, owner: &str) -> Initial {
    let id = s.definition.id.as_str();
    let marker = |pid: i32| sys::carries_marker(pid, ID_ENV, id, OWNER_ENV, owner);
    match &s.process {
        Some(identity) => match state::recognize(identity, marker) {
            Recognized::Alive => {
                let mut identity = identity.clone();
                identity.verify_groups(marker);
                Initial::Adopt {
                    identity,
                    start_time: s.start_time,
                    restarts: s.restarts,
                    desired: s.desired,
                }
            }
            Recognized::Gone => Initial::Lost {
                reason: format!(
                    "pid {} was not running after the supervisor restarted (exit status unknown)",
                    identity.pid
                ),
                restarts: s.restarts,
                desired: s.desired,
            },
            Recognized::Reused(reason) => Initial::Lost {
                reason,
                restarts: s.restarts,
                desired: s.desired,
            },
        },
        None => Initial::Saved {
            state: s.state,
            desired: s.desired,
            restarts: s.restarts,
            last_error: s.last_error.clone(),
        },
    }
}

/// Cheap, cloneable handle to a running supervisor. Every method returns promptly: commands only start
/// operations, whose progress is reported through the event channel and the status table.
#[derive(Clone)]
pub struct SupervisorHandle {
    ctx: Arc<Ctx>,
}

impl SupervisorHandle {
    async fn command(&self, id: &str, make: impl FnOnce(actor::Reply) -> ActorCmd) -> Result<(), SupervisorError> {
        if self.ctx.closing.load(Ordering::SeqCst) {
            return Err(SupervisorError::Closed);
        }
        let tx = {
            let table = self.ctx.table();
            let slot = table
                .slots
                .iter()
                .find(|s| s.record.id == id && !s.removing)
                .ok_or_else(|| SupervisorError::UnknownProcess(id.to_owned()))?;
            slot.tx.clone()
        };
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply)).map_err(|_| SupervisorError::Closed)?;
        rx.await.map_err(|_| SupervisorError::Closed)?
    }

    /// Starts a process (no-op if starting or running; queued if stopping). An operator start clears `FATAL`.
    ///
    /// # Errors
    /// [`SupervisorError::UnknownProcess`], [`SupervisorError::Closed`].
    pub async fn start(&self, id: &str) -> Result<(), SupervisorError> {
        self.command(id, ActorCmd::Start).await
    }

    /// Initiates a stop and returns at once; the stop (signal, timeout, SIGKILL, group empty) goes on in the
    /// background and ends in `STOPPED`.
    ///
    /// # Errors
    /// [`SupervisorError::UnknownProcess`], [`SupervisorError::Closed`].
    pub async fn stop(&self, id: &str) -> Result<(), SupervisorError> {
        self.command(id, ActorCmd::Stop).await
    }

    /// Stops (if needed) and starts again with the current definition.
    ///
    /// # Errors
    /// [`SupervisorError::UnknownProcess`], [`SupervisorError::Closed`].
    pub async fn restart(&self, id: &str) -> Result<(), SupervisorError> {
        self.command(id, ActorCmd::Restart).await
    }

    /// The status of one process.
    ///
    /// # Errors
    /// [`SupervisorError::UnknownProcess`].
    pub fn get(&self, id: &str) -> Result<ProcessRecord, SupervisorError> {
        let table = self.ctx.table();
        table
            .slots
            .iter()
            .find(|s| s.record.id == id)
            .map(snapshot_record)
            .ok_or_else(|| SupervisorError::UnknownProcess(id.to_owned()))
    }

    /// The definition in effect for a process, if it is defined.
    pub fn definition(&self, id: &str) -> Option<ProcessDefinition> {
        let table = self.ctx.table();
        table
            .slots
            .iter()
            .find(|s| s.record.id == id && !s.removing)
            .map(|s| (*s.def).clone())
    }

    /// All statuses, with the sequence number of the last event they include.
    pub fn list(&self) -> (u64, Vec<ProcessRecord>) {
        let table = self.ctx.table();
        (table.seq, table.slots.iter().map(snapshot_record).collect())
    }

    /// What [`SupervisorHandle::list`] returns, read in place instead of copied: status polling's hot path
    /// (a hundred records copied, then turned into a reply, cost more than the reply's encoding). `visit`
    /// runs under the table's lock, which the process actors also take: it must be quick.
    pub fn visit_records<R>(&self, visit: impl FnOnce(u64, &mut dyn Iterator<Item = RecordView<'_>>) -> R) -> R {
        let table = self.ctx.table();
        let now = unix_now();
        let mut views = table.slots.iter().map(|s| RecordView::of(s, now));
        visit(table.seq, &mut views)
    }

    /// The last `n` lines of a process's output (stdout and stderr, in arrival order).
    ///
    /// # Errors
    /// [`SupervisorError::UnknownProcess`].
    pub fn log_tail(&self, id: &str, n: usize) -> Result<Vec<String>, SupervisorError> {
        let sink = {
            let table = self.ctx.table();
            table
                .slots
                .iter()
                .find(|s| s.record.id == id)
                .map(|s| s.sink.clone())
                .ok_or_else(|| SupervisorError::UnknownProcess(id.to_owned()))?
        };
        Ok(sink.tail(n))
    }

    /// Installs the hook run before a CGSE service (a process with a `service_type`) is restarted; only the
    /// first call takes effect.
    pub fn set_restart_hook(&self, hook: Arc<dyn RestartHook>) {
        let _ = self.ctx.restart_hook.set(hook);
    }

    /// The order in which to stop the defined processes: layers, dependents first (reverse `depends_on`);
    /// the ids of one layer can stop in parallel. Dependencies on undefined ids are ignored; should the live
    /// definitions form a cycle (they can only through separate `define` calls), everything is one layer.
    pub fn stop_order(&self) -> Vec<Vec<String>> {
        let table = self.ctx.table();
        let live: Vec<&ProcessDefinition> = table.slots.iter().filter(|s| !s.removing).map(|s| &*s.def).collect();
        match DependencyGraph::of_definitions(live.iter().copied()) {
            Ok(g) => g.stop_order(),
            Err(e) => {
                tracing::warn!(error = %e, "stopping without an order");
                vec![live.iter().map(|d| d.id.clone()).collect()]
            }
        }
    }

    /// Events dropped because the channel was full.
    pub fn dropped_events(&self) -> u64 {
        self.ctx.table().dropped_events
    }

    /// Makes `definitions` the full set: adds new ones (started if `autostart`), stops and forgets removed
    /// ones, restarts changed ones that are running, leaves the rest alone. With `dry_run`, only the plan.
    ///
    /// # Errors
    /// Invalid or duplicate definitions; an id still being removed by an earlier call.
    pub async fn apply(&self, definitions: Vec<ProcessDefinition>, dry_run: bool) -> Result<Plan, SupervisorError> {
        check_unique(&definitions)?;
        let _serial = self.ctx.apply_lock.lock().await;
        if self.ctx.closing.load(Ordering::SeqCst) {
            return Err(SupervisorError::Closed);
        }
        let mut plan = Plan::default();
        let mut to_replace = Vec::new();
        let mut to_add = Vec::new();
        let mut to_remove = Vec::new();
        {
            let table = self.ctx.table();
            let current: BTreeMap<&str, &Slot> = table.slots.iter().map(|s| (s.record.id.as_str(), s)).collect();
            for def in definitions {
                match current.get(def.id.as_str()) {
                    Some(slot) if slot.removing => return Err(SupervisorError::Duplicate(def.id)),
                    Some(slot) if *slot.def == def => plan.unchanged.push(def.id),
                    Some(slot) => {
                        plan.changed.push(def.id.clone());
                        to_replace.push((slot.tx.clone(), def));
                    }
                    None => {
                        plan.added.push(def.id.clone());
                        to_add.push(def);
                    }
                }
            }
            let keep: HashSet<&str> = plan
                .added
                .iter()
                .chain(&plan.changed)
                .chain(&plan.unchanged)
                .map(String::as_str)
                .collect();
            for slot in table
                .slots
                .iter()
                .filter(|s| !s.removing && !keep.contains(s.record.id.as_str()))
            {
                plan.removed.push(slot.record.id.clone());
                to_remove.push(slot.record.id.clone());
            }
        }
        if dry_run {
            return Ok(plan);
        }
        for id in &to_remove {
            let mut table = self.ctx.table();
            if let Some(slot) = table.slot_mut(id) {
                slot.removing = true;
                let _ = slot.tx.send(ActorCmd::Remove);
            }
        }
        for (tx, def) in to_replace {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(ActorCmd::Replace {
                    def: Arc::new(def),
                    restart: true,
                    reply,
                })
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        for def in to_add {
            self.ctx.add_process(def, Initial::Fresh, false)?;
        }
        self.ctx.persister.dirty();
        Ok(plan)
    }

    /// Adds or replaces one definition (e.g. a device from the Setup); a changed running process is restarted.
    ///
    /// # Errors
    /// An invalid definition; an id being removed.
    pub async fn define(&self, def: ProcessDefinition) -> Result<Change, SupervisorError> {
        def.validate()?;
        let _serial = self.ctx.apply_lock.lock().await;
        if self.ctx.closing.load(Ordering::SeqCst) {
            return Err(SupervisorError::Closed);
        }
        let existing = {
            let mut table = self.ctx.table();
            let stem = logs::file_stem(&def.id);
            if let Some(other) = table
                .slots
                .iter()
                .find(|s| s.record.id != def.id && logs::file_stem(&s.record.id) == stem)
            {
                return Err(SupervisorError::Duplicate(format!(
                    "{} (log name of {})",
                    def.id, other.record.id
                )));
            }
            match table.slots.iter_mut().find(|s| s.record.id == def.id) {
                Some(s) if s.removing => return Err(SupervisorError::Duplicate(def.id)),
                Some(s) => {
                    // The table or the Setup defines it now: it is no longer a client's.
                    s.transient = false;
                    if *s.def == def {
                        return Ok(Change::Unchanged);
                    }
                    Some(s.tx.clone())
                }
                None => None,
            }
        };
        match existing {
            Some(tx) => {
                let (reply, rx) = oneshot::channel();
                tx.send(ActorCmd::Replace {
                    def: Arc::new(def),
                    restart: true,
                    reply,
                })
                .map_err(|_| SupervisorError::Closed)?;
                rx.await.map_err(|_| SupervisorError::Closed)??;
                Ok(Change::Changed)
            }
            None => {
                self.ctx.add_process(def, Initial::Fresh, false)?;
                Ok(Change::Added)
            }
        }
    }

    /// Adds a definition a client asked for (a legacy launcher): it is removed again as soon as its process
    /// is stopped, exits or goes FATAL, and at most `max_client_processes` exist at a time. An id that is
    /// already defined is left as it is.
    ///
    /// # Errors
    /// An invalid definition; [`SupervisorError::Limit`] when the cap is reached.
    pub async fn define_client(&self, def: ProcessDefinition) -> Result<Change, SupervisorError> {
        def.validate()?;
        let _serial = self.ctx.apply_lock.lock().await;
        if self.ctx.closing.load(Ordering::SeqCst) {
            return Err(SupervisorError::Closed);
        }
        {
            let table = self.ctx.table();
            match table.slots.iter().find(|s| s.record.id == def.id) {
                Some(s) if s.removing => return Err(SupervisorError::Duplicate(def.id)),
                Some(_) => return Ok(Change::Unchanged),
                None => {}
            }
            let stem = logs::file_stem(&def.id);
            if let Some(other) = table.slots.iter().find(|s| logs::file_stem(&s.record.id) == stem) {
                return Err(SupervisorError::Duplicate(format!(
                    "{} (log name of {})",
                    def.id, other.record.id
                )));
            }
            let clients = table.slots.iter().filter(|s| s.transient && !s.removing).count();
            let cap = self.ctx.config.max_client_processes;
            if clients >= cap {
                return Err(SupervisorError::Limit(format!(
                    "{clients} client-created processes exist, the limit (Procman.MAX_CLIENT_PROCESSES) is {cap}; \
                     stop one first or define the device in the process table"
                )));
            }
        }
        self.ctx.add_process(def, Initial::Fresh, true)?;
        Ok(Change::Added)
    }

    /// Whether `id` was created by a client ([`SupervisorHandle::define_client`]) and is still one.
    pub fn is_client_defined(&self, id: &str) -> bool {
        self.ctx.table().slots.iter().any(|s| s.record.id == id && s.transient)
    }

    /// Waits until the state file reflects every transition made before this call.
    pub async fn flush_state(&self) {
        self.ctx.persister.flush().await;
    }

    /// Shuts the supervisor down. With `stop_children`, every process is stopped (in parallel, each with its
    /// own stop timeout) first; without, they keep running and the next supervisor re-adopts them. The state
    /// file is written last. Desired states are kept, so the next supervisor resumes what was running.
    pub async fn shutdown(&self, stop_children: bool) {
        if self.ctx.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let _serial = self.ctx.apply_lock.lock().await;
        // Stopping: dependents first, one layer at a time. Leaving them running: all at once.
        let layers = if stop_children {
            self.stop_order()
        } else {
            vec![self.ctx.table().slots.iter().map(|s| s.record.id.clone()).collect()]
        };
        let mut done: HashSet<String> = HashSet::new();
        for layer in layers {
            self.shutdown_layer(&layer, stop_children).await;
            done.extend(layer);
        }
        // Rows being removed are not in the order; they go last.
        let rest: Vec<String> = {
            let table = self.ctx.table();
            table
                .slots
                .iter()
                .map(|s| s.record.id.clone())
                .filter(|id| !done.contains(id))
                .collect()
        };
        self.shutdown_layer(&rest, stop_children).await;
        self.ctx.persister.flush().await;
        self.ctx.stop_writer.cancel();
        let table = self.ctx.table();
        for s in &table.slots {
            s.sink.close(false);
        }
    }
}

impl SupervisorHandle {
    /// Shuts down the state machines of `ids` in parallel and waits for them, bounded by the longest stop.
    async fn shutdown_layer(&self, ids: &[String], stop_children: bool) {
        let (waits, longest) = {
            let table = self.ctx.table();
            let mut longest = Duration::ZERO;
            let waits: Vec<_> = table
                .slots
                .iter()
                .filter(|s| ids.contains(&s.record.id))
                .filter_map(|s| {
                    longest = longest.max(s.def.stop_timeout);
                    let (done, rx) = oneshot::channel();
                    s.tx.send(ActorCmd::Shutdown { stop_children, done }).ok().map(|_| rx)
                })
                .collect();
            (waits, longest)
        };
        let bound = longest + self.ctx.config.kill_grace + Duration::from_secs(1);
        let all = async {
            for rx in waits {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!(
                ?bound,
                ?ids,
                "some processes did not finish stopping before the shutdown bound"
            );
        }
    }
}

fn snapshot_record(slot: &Slot) -> ProcessRecord {
    let view = RecordView::of(slot, unix_now());
    let mut r = slot.record.clone();
    r.log_dropped_bytes = view.log_dropped_bytes;
    r.uptime_s = view.uptime_s;
    r
}

/// One status as [`SupervisorHandle::list`] reports it, borrowed from the table: the record and the two
/// fields that are computed when asked.
pub struct RecordView<'a> {
    /// The stored record; its `uptime_s` and `log_dropped_bytes` are stale, use the fields below.
    pub record: &'a ProcessRecord,
    /// Seconds since the start while starting, running or stopping.
    pub uptime_s: Option<f64>,
    /// Output bytes the log sink has dropped so far.
    pub log_dropped_bytes: u64,
}

impl RecordView<'_> {
    fn of(slot: &Slot, now: f64) -> RecordView<'_> {
        let r = &slot.record;
        let uptime_s = match (r.state, r.start_time) {
            (ProcessState::Starting | ProcessState::Running | ProcessState::Stopping, Some(t)) => {
                Some((now - t).max(0.0))
            }
            _ => None,
        };
        RecordView {
            record: r,
            uptime_s,
            log_dropped_bytes: slot.sink.dropped(),
        }
    }
}
