//! The runner and the step protocol on the fake engine of kiln-testkit: no
//! database server needed. Real engines are covered by their own suites and
//! the conformance suite; these pin down the protocol itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::engine::Step;
#[allow(unused_imports)]
use kiln_core::engine::{Engine as _, Locker as _};
use kiln_core::step::{Outcome, Stepper};
use kiln_core::{load_dir, DownTarget, FailureOutcome, LoadOptions, Migration, Policy, RunError, Runner, RunnerSettings, State, UpTarget};
use kiln_testkit::compat::Protocol;
use kiln_testkit::fake::{FakeDb, FakeEngine};

fn write(dir: &Path, name: &str, body: &str) {
    std::fs::write(dir.join(name), body).unwrap();
}

fn load(dir: &Path) -> Vec<Migration> {
    load_dir(dir, &LoadOptions::default()).unwrap()
}

fn settings() -> RunnerSettings {
    RunnerSettings { lock_timeout: Duration::from_millis(200), actor: "test@host".into() }
}

/// Three migrations; the second is reversible only.
fn three(dir: &Path) -> Vec<Migration> {
    write(dir, "0001_a.sql", "-- kiln:up\nCREATE a;\n-- kiln:down\nDROP a;\n");
    write(dir, "0002_b.sql", "-- kiln:up\nCREATE b;\nCREATE b2;\n-- kiln:down\nDROP b2;\nDROP b;\n");
    write(dir, "0003_c.sql", "-- kiln:up\nCREATE c;\n-- kiln:down\nDROP c;\n");
    load(dir)
}

async fn up(engine: FakeEngine, local: &[Migration]) -> Result<kiln_core::RunReport, RunError> {
    let mut b = Protocol::new(engine);
    Runner::new(&mut b, settings()).up(local, &UpTarget::Latest, &Policy::default(), false).await
}

#[tokio::test]
async fn up_and_down_on_both_paths() {
    for transactional in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let local = three(dir.path());
        let db = FakeDb::new();
        let engine = if transactional { db.transactional() } else { db.non_transactional() };
        let r = up(engine, &local).await.unwrap();
        assert_eq!(r.steps.len(), 3);
        assert_eq!(db.states(), [(1, "applied".into()), (2, "applied".into()), (3, "applied".into())]);
        assert_eq!(db.events(), ["run-start", "applied", "applied", "applied", "run-end"]);
        assert_eq!(db.state().tables, ["a", "b", "b2", "c"]);
        assert!(!db.locked());

        let engine = if transactional { db.transactional() } else { db.non_transactional() };
        let mut b = Protocol::new(engine);
        let r = Runner::new(&mut b, settings()).down(&local, &DownTarget::Steps(2), false).await.unwrap();
        assert_eq!(r.steps.len(), 2);
        assert_eq!(db.states(), [(1, "applied".into())]);
        assert_eq!(db.state().tables, ["a"]);
        assert!(!db.locked());
    }
}

#[tokio::test]
async fn merged_finishes_save_a_commit_per_migration() {
    let dir = tempfile::tempdir().unwrap();
    let local = three(dir.path());
    let merged = FakeDb::new();
    up(merged.non_transactional(), &local).await.unwrap();
    let separate = FakeDb::new();
    let caps = kiln_core::engine::Capabilities { merge_finish: false, ..separate.non_transactional().capabilities_for_test() };
    up(separate.connect(caps), &local).await.unwrap();
    // run-start, 3 intents (the last two carry the previous finish), the last
    // finish, run-end: 6 commits, against 3 more when every finish commits alone.
    assert_eq!(merged.state().commits, 6);
    assert_eq!(separate.state().commits, 8);
    assert_eq!(merged.states(), separate.states());
}

trait CapsForTest {
    fn capabilities_for_test(&self) -> kiln_core::engine::Capabilities;
}

impl CapsForTest for FakeEngine {
    fn capabilities_for_test(&self) -> kiln_core::engine::Capabilities {
        kiln_core::engine::Engine::capabilities(self)
    }
}

#[tokio::test]
async fn a_failing_transactional_migration_leaves_nothing_and_releases_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\n");
    write(dir.path(), "0002_b.sql", "CREATE b;\nFAIL;\n");
    let local = load(dir.path());
    let db = FakeDb::new();
    let err = up(db.transactional(), &local).await.unwrap_err();
    let RunError::Migration { version, outcome, error, done } = err else { panic!("expected a migration error, got {err}") };
    assert_eq!((version.number, outcome, error.statement, error.line), (2, FailureOutcome::RolledBack, 2, 2));
    assert_eq!(done.iter().map(|v| v.number).collect::<Vec<_>>(), [1]);
    assert_eq!(db.states(), [(1, "applied".into())]);
    assert_eq!(db.state().tables, ["a"], "nothing of 0002 remains");
    assert_eq!(db.events(), ["run-start", "applied", "failed", "run-end"]);
    assert!(!db.locked());
}

#[tokio::test]
async fn the_intent_path_records_what_a_failure_left() {
    // Fails at its first statement: nothing remains, the intent is undone.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "-- kiln:transaction off\n-- kiln:up\nFAIL;\nCREATE a;\n");
    let db = FakeDb::new();
    let err = up(db.transactional(), &load(dir.path())).await.unwrap_err();
    assert!(matches!(err, RunError::Migration { outcome: FailureOutcome::RolledBack, .. }), "{err}");
    assert_eq!(db.states(), []);
    assert!(!db.locked());

    // Fails at its second: the first remains, the entry is failed and blocks.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "-- kiln:transaction off\n-- kiln:up\nCREATE a;\nFAIL;\n");
    let local = load(dir.path());
    let db = FakeDb::new();
    let err = up(db.transactional(), &local).await.unwrap_err();
    let RunError::Migration { outcome, error, .. } = &err else { panic!("{err}") };
    assert_eq!(*outcome, FailureOutcome::RecordedFailed);
    assert!(error.message.contains("statement 1 was committed on its own") && error.message.contains("kiln repair 0001"), "{}", error.message);
    assert_eq!(db.states(), [(1, "failed".into())]);
    assert_eq!(db.state().tables, ["a"]);
    let recorded = db.state().history.as_ref().unwrap()[&1].error.clone().unwrap();
    assert_eq!((recorded.statement, recorded.line), (Some(2), Some(4)));
    assert!(!db.locked());
    let again = up(db.transactional(), &local).await.unwrap_err();
    assert!(matches!(&again, RunError::Plan(p) if matches!(p[0], kiln_core::PlanError::Blocked { .. })), "{again}");
    assert!(!db.locked());
}

#[tokio::test]
async fn a_lost_connection_leaves_the_intent_running() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\nLOSE;\n");
    let db = FakeDb::new();
    let err = up(db.non_transactional(), &load(dir.path())).await.unwrap_err();
    assert!(matches!(err, RunError::Engine(kiln_core::EngineError::ConnectionLost { .. })), "{err}");
    assert_eq!(db.states(), [(1, "running".into())]);
    assert!(!db.locked());
}

#[tokio::test]
async fn a_refused_body_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\nREFUSE;\n");
    let db = FakeDb::new();
    let err = up(db.transactional(), &load(dir.path())).await.unwrap_err();
    assert!(matches!(err, RunError::Migration { outcome: FailureOutcome::RolledBack, .. }), "{err}");
    assert!(db.state().executed.is_empty(), "nothing ran");
    assert_eq!(db.states(), []);
    assert_eq!(db.events(), ["run-start", "failed", "run-end"]);
}

#[tokio::test]
async fn the_lock_is_released_when_the_run_is_dropped_mid_migration() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\n");
    write(dir.path(), "0002_hangs.sql", "-- kiln:transaction off\n-- kiln:up\nHANG;\n");
    let local = load(dir.path());
    let db = FakeDb::new();
    let run = up(db.transactional(), &local);
    let timed_out = tokio::time::timeout(Duration::from_millis(200), run).await;
    assert!(timed_out.is_err(), "the run hangs in 0002");
    assert!(!db.locked(), "dropping the future released the lock");
    assert_eq!(db.states(), [(1, "applied".into()), (2, "running".into())], "the interrupted migration blocks");
}

#[tokio::test]
async fn a_refused_plan_releases_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let local = three(dir.path());
    let db = FakeDb::new();
    up(db.transactional(), &local).await.unwrap();
    write(dir.path(), "0002_b.sql", "-- kiln:up\nCREATE changed;\n");
    write(dir.path(), "0004_d.sql", "CREATE d;\n");
    let err = up(db.transactional(), &load(dir.path())).await.unwrap_err();
    assert!(matches!(&err, RunError::Plan(p) if matches!(p[0], kiln_core::PlanError::ChecksumMismatch { .. })), "{err}");
    assert!(!db.locked());
    assert!(!db.state().tables.contains(&"d".to_string()));
}

#[tokio::test]
async fn a_second_runner_times_out_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\n");
    let db = FakeDb::new();
    let mut first = db.transactional();
    assert!(kiln_core::engine::Locker::try_lock(&mut first).await.unwrap());
    let err = up(db.transactional(), &load(dir.path())).await.unwrap_err();
    let RunError::Engine(kiln_core::EngineError::LockTimeout { holder, .. }) = &err else { panic!("{err}") };
    assert_eq!(holder, "fake connection 1");
    assert_eq!(db.states(), []);
}

#[tokio::test]
async fn a_phase_state_is_recorded_without_engine_changes() {
    // A zero-downtime phase records its own state through the same protocol.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\n");
    let local = load(dir.path());
    let db = FakeDb::new();
    let mut engine = db.non_transactional();
    kiln_core::engine::HistoryStore::ensure(&mut engine).await.unwrap();
    let mut stepper = Stepper::new(&mut engine);
    let m = &local[0];
    let step = Step { migration: m, direction: kiln_core::Direction::Up, body: &m.up, batch: 7, actor: "t@h" };
    stepper.run(&step, None, &Outcome::Record(State::Baseline), None).await.unwrap();
    assert!(stepper.has_pending(), "the finish waits for the next commit on a merging engine");
    stepper.flush(Default::default()).await.unwrap();
    assert_eq!(db.states(), [(1, "baseline".into())]);
    assert_eq!(db.state().history.as_ref().unwrap()[&1].batch, 7);
}

#[tokio::test]
async fn a_contract_violation_is_rolled_back_or_recorded() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE users;\n");
    write(dir.path(), "0002_b.sql", "-- kiln:up\nDROP users;\n-- kiln:down\nCREATE users;\n");
    let local = load(dir.path());
    let contract = kiln_core::schema::Contract::parse("tables:\n  users:\n    required: []\n", "schema.yaml").unwrap();
    for transactional in [true, false] {
        let db = FakeDb::new();
        let engine = if transactional { db.transactional() } else { db.non_transactional() };
        let mut b = Protocol::new(engine);
        let err = Runner::new(&mut b, settings())
            .with_contract(Some(Arc::new(contract.clone())))
            .up(&local, &UpTarget::Latest, &Policy::default(), false)
            .await
            .unwrap_err();
        let RunError::Invalid { version, outcome, .. } = &err else { panic!("{err}") };
        assert_eq!(version.number, 2);
        if transactional {
            assert_eq!(*outcome, FailureOutcome::RolledBack);
            assert_eq!(db.states(), [(1, "applied".into())]);
            assert_eq!(db.state().tables, ["users"]);
        } else {
            assert_eq!(*outcome, FailureOutcome::RecordedFailed);
            assert_eq!(db.states(), [(1, "applied".into()), (2, "failed".into())]);
        }
        assert!(!db.locked());
    }
}

#[tokio::test]
async fn a_version_no_history_can_store_is_refused_before_anything_runs() {
    // 2^63 was stored as a negative number (MongoDB `_id`, SQL BIGINT) and then
    // broke every later command.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\n");
    write(dir.path(), "9223372036854775808_big.sql", "CREATE big;\n");
    let db = FakeDb::new();
    let err = up(db.transactional(), &load(dir.path())).await.unwrap_err();
    assert!(
        matches!(&err, RunError::Plan(p) if matches!(&p[0], kiln_core::PlanError::VersionTooLarge { version, .. } if version == "9223372036854775808")),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("9223372036854775808_big.sql"), "{err}");
    assert!(db.state().executed.is_empty());
    assert_eq!(db.states(), []);
    // The largest storable version is fine.
    std::fs::remove_file(dir.path().join("9223372036854775808_big.sql")).unwrap();
    write(dir.path(), "9223372036854775807_max.sql", "CREATE max;\n");
    up(db.transactional(), &load(dir.path())).await.unwrap();
    assert_eq!(db.states().last().unwrap().0, i64::MAX as u64);
}

#[tokio::test]
async fn events_carry_the_runners_target() {
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<String>>);
    impl kiln_core::Observer for Seen {
        fn on_event(&self, _: &kiln_core::Event) {
            panic!("a runner with a target reports through on_targeted");
        }
        fn on_targeted(&self, target: Option<&str>, event: &kiln_core::Event) {
            let json = serde_json::to_value(kiln_core::TargetedEvent { target: target.map(str::to_string), event: event.clone() }).unwrap();
            self.0.lock().unwrap().push(format!("{} {}", json["target"].as_str().unwrap(), json["event"].as_str().unwrap()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "0001_a.sql", "CREATE a;\n");
    let db = FakeDb::new();
    let seen = Arc::new(Seen::default());
    let mut b = Protocol::new(db.transactional());
    Runner::new(&mut b, settings())
        .with_target("acme")
        .with_observer(seen.clone())
        .up(&load(dir.path()), &UpTarget::Latest, &Policy::default(), false)
        .await
        .unwrap();
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen, ["acme lock-acquired", "acme planned", "acme step-started", "acme step-finished"]);
}
