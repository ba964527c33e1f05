//! kiln-core: the model, migration loading, the planner and the engine contract —
//! no database code.
//!
//! The one design decision to know: planning is pure. [`plan::plan_up`] and
//! [`plan::plan_down`] compare migrations on disk ([`Migration`]) with what the
//! database recorded ([`AppliedMigration`]) and return a plan or every problem
//! found, without I/O; the [`runner::Runner`] takes the lock, re-reads the
//! history under it, plans, and drives a [`backend::Backend`] step by step.

#![warn(missing_docs)]
// `RunError` carries the failed migration's details (statement, outcome, what
// ran before) by value: errors end a run, so their size costs nothing that matters.
#![allow(clippy::result_large_err)]

pub mod adopt;
pub mod backend;
pub mod code;
pub mod engine;
pub mod error;
pub mod event;
pub mod jobs;
pub mod lock;
pub mod model;
pub mod plan;
pub mod report;
pub mod runner;
pub mod schema;
pub mod session;
pub mod source;
pub mod split;
pub mod step;
pub mod suggest;
pub mod url;

pub use backend::{ApplyError, BackendConfig, RecordContext, StepError};
pub use code::{CodeContext, CodeError, CodeMigration};
pub use engine::{Capabilities, Engine, SchemaCheck};
pub use error::{EngineError, FailureOutcome, PlanError, RunError, SourceError, StatementError};
pub use event::{Direction, Event, Observer, TargetedEvent};
pub use model::*;
pub use plan::{DownTarget, Policy, StatusRow, UpTarget};
pub use runner::{AdminReport, ContractReport, ContractWait, RunReport, Runner, RunnerSettings, StepReport};
pub use source::{load_dir, load_dir_lenient, load_embedded, load_embedded_lenient, Embedded, EmbeddedFile, LoadOptions};
