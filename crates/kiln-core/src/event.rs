//! Events the runner emits while it works. The library never prints: the CLI
//! renders these, the HTTP API serves them, and logs record them.

use std::time::Duration;

use serde::Serialize;

/// Direction of a step.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Apply.
    Up,
    /// Revert.
    Down,
}

/// Something that happened during a run.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// Another runner holds the lock; waiting for it.
    LockWaiting {
        /// Who holds it.
        holder: String,
        /// How long we will wait.
        timeout: Duration,
    },
    /// The lock is ours.
    LockAcquired,
    /// The plan is ready.
    Planned {
        /// Direction.
        direction: Direction,
        /// Number of steps.
        steps: usize,
        /// Batch (for up).
        batch: Option<i64>,
    },
    /// A migration starts.
    StepStarted {
        /// Direction.
        direction: Direction,
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// 1-based position in the plan.
        index: usize,
        /// Steps in the plan.
        total: usize,
    },
    /// A migration finished.
    StepFinished {
        /// Direction.
        direction: Direction,
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// How long it took.
        duration: Duration,
    },
    /// Something worth telling the operator that does not stop the run.
    Warning {
        /// What.
        message: String,
    },
    /// A migration failed.
    StepFailed {
        /// Direction.
        direction: Direction,
        /// Version.
        version: String,
        /// Description.
        name: String,
        /// The error.
        message: String,
    },
}

/// An event with the database (or tenant) it concerns, as the HTTP API and
/// fleet reports serve it: `{"target": "acme", "event": "step-started", …}`.
#[derive(Clone, Debug, Serialize)]
pub struct TargetedEvent {
    /// The runner's target label ([`crate::Runner::with_target`]); `None` for
    /// a runner over a single database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// Receives events. Implementations must be cheap: they run on the runner's task.
pub trait Observer: Send + Sync {
    /// Called for every event, in order.
    fn on_event(&self, event: &Event);

    /// Called instead of [`Observer::on_event`] by a runner that has a target
    /// label (a tenant of a fleet, a database of several); the default drops
    /// the label. Observers that watch several runners override this.
    fn on_targeted(&self, target: Option<&str>, event: &Event) {
        let _ = target;
        self.on_event(event)
    }
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {
    fn on_event(&self, _event: &Event) {}
}

impl<F: Fn(&Event) + Send + Sync> Observer for F {
    fn on_event(&self, event: &Event) {
        self(event)
    }
}
