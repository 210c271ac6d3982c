//! What a process waits for before it is spawned: its dependencies (`depends_on`) `RUNNING` — hence ready,
//! since a process with readiness only becomes `RUNNING` once its check passed — and, before a restart of a
//! CGSE service, the [`RestartHook`] (the daemon clears the stale registry record of the dead instance).
//!
//! The wait is event driven: every state change bumps a `watch` counter in the table, and a waiting gate
//! re-reads the table when it moves.

use std::sync::Arc;
use std::time::Duration;

use super::definition::ProcessDefinition;
use super::record::ProcessState;
use super::Ctx;

/// Runs before a process with a `service_type` is started again after it ended (a crash, a reaped exit).
pub trait RestartHook: Send + Sync {
    /// Prepares the restart of `def`; the supervisor waits for it at most [`RESTART_HOOK_BOUND`].
    fn before_restart(&self, def: &ProcessDefinition) -> GateFuture;
}

/// The longest a restart waits for the [`RestartHook`]: a hung registry must not keep a service down.
pub const RESTART_HOOK_BOUND: Duration = Duration::from_secs(5);

pub(crate) type GateFuture = crate::util::BoxFuture<'static, ()>;

/// The dependencies of `def` that are not `RUNNING` now (undefined ones included), in `depends_on` order.
pub(crate) fn unmet(ctx: &Ctx, def: &ProcessDefinition) -> Vec<String> {
    let table = ctx.table();
    def.depends_on
        .iter()
        .filter(|d| {
            !table
                .slots
                .iter()
                .any(|s| s.record.id == **d && !s.removing && s.record.state == ProcessState::Running)
        })
        .cloned()
        .collect()
}

/// The wait before spawning `def`, or `None` when it can be spawned now: no unmet dependency and no hook to
/// run (`restarting` with a `service_type` and a hook installed).
pub(crate) fn gate(ctx: &Arc<Ctx>, def: &Arc<ProcessDefinition>, restarting: bool) -> Option<GateFuture> {
    let hook = if restarting && def.service_type.is_some() {
        ctx.restart_hook.get().cloned()
    } else {
        None
    };
    if hook.is_none() && unmet(ctx, def).is_empty() {
        return None;
    }
    let ctx = ctx.clone();
    let def = def.clone();
    Some(Box::pin(async move {
        let mut changed = ctx.table().changed.subscribe();
        while !unmet(&ctx, &def).is_empty() {
            if changed.changed().await.is_err() {
                // The supervisor is gone; nothing will ever change.
                std::future::pending::<()>().await;
            }
        }
        if let Some(hook) = hook {
            if tokio::time::timeout(RESTART_HOOK_BOUND, hook.before_restart(&def))
                .await
                .is_err()
            {
                tracing::warn!(id = %def.id, bound = ?RESTART_HOOK_BOUND, "restart hook did not finish; restarting anyway");
            }
        }
    }))
}
