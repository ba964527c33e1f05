//! The library-level conformance suite: each protocol scenario written once
//! and run on every engine it applies to — PostgreSQL, MySQL/MariaDB, SQLite
//! and MongoDB — through `kiln_core::Runner` (or one step at a time through
//! kiln-testkit's `compat::Backend`) on an engine from `kiln_sql::connect` /
//! `kiln_mongo::connect`.
//!
//! Every scenario is an `async fn name(engine: Engine)`; [`on!`] turns it into
//! one test per engine, `name::postgres`, `name::mysql`, `name::sqlite`,
//! `name::mongodb`, each on its own fresh database ([`kiln_testkit::case::EngineCase`]),
//! so they run in parallel. What differs by engine (the SQL of a migration, the
//! text naming a lock holder) is in the scenario, in a `match case.engine`.
//! Tests of one engine's own behaviour stay in `tests/{postgres,mysql,sqlite}.rs`
//! and in kiln-mongo; the binary-level suite is `crates/kiln/tests/conformance.rs`.
//!
//! Modules: [`protocol`] (apply, revert, refusals, custom tables, baseline,
//! the lock), [`contracts`] (snapshots and schema contracts), [`inspect`]
//! (schema inspection and scratch databases), [`connect`] (URLs and
//! connection errors), [`jobs`] (backfill jobs on the SQL engines).

/// `on!(scenario: postgres, mysql, sqlite, mongodb)`: one test per engine
/// named, each calling `scenario(engine)` on a multi-threaded runtime.
macro_rules! on {
    ($scenario:ident: $($engine:ident),+ $(,)?) => {
        mod $scenario {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $engine() {
                    super::$scenario(crate::support::engine(stringify!($engine))).await
                }
            )+
        }
    };
}

mod connect;
mod contracts;
mod inspect;
mod jobs;
mod protocol;
mod support;
