//! One QuickJS runtime per evaluation: the natives the prelude builds on, the
//! ES module resolver and loader, the job loop that drives promises and
//! timers, and the translation of JavaScript errors into [`ScriptError`]s
//! that name the file and line the user wrote.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::{CatchResultExt, CaughtError, Context, Ctx, Exception, Function, Module, Object, Runtime, Value};

use crate::modules::{self, Resolved};
use crate::mongo::Mongo;
use crate::transpile::{self, Loaded, ModuleKind};
use crate::{Limits, LogSink, Report, Run, ScriptError};

const PRELUDE: &str = include_str!("prelude.js");

/// Console levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// `console.debug`, `console.trace`.
    Debug,
    /// `console.log`, `console.info`.
    Info,
    /// `console.warn`.
    Warn,
    /// `console.error`.
    Error,
}

/// `path` as a user would write it: relative to the working directory when inside it.
pub fn display_path(path: &Path) -> String {
    let cwd = std::env::current_dir().ok().and_then(|c| std::fs::canonicalize(c).ok());
    match cwd.as_ref().and_then(|c| path.strip_prefix(c).ok()) {
        Some(rel) => rel.display().to_string(),
        None => path.display().to_string(),
    }
}

struct State {
    env: BTreeMap<String, String>,
    loaded: HashMap<PathBuf, Loaded>,
    mongo: Option<Mongo>,
    deadline: Instant,
    log: Option<LogSink>,
    /// The last specifier an ES module could not resolve: (importing file, specifier, why).
    unresolved: Option<(PathBuf, String, String)>,
    memory_limit: usize,
}

type Shared = Rc<RefCell<State>>;

fn file_of(name: &str) -> PathBuf {
    PathBuf::from(name.strip_suffix("#cjs").unwrap_or(name))
}

impl State {
    /// Read and transform `path` (cached).
    fn load(&mut self, path: &Path) -> Result<Loaded, ScriptError> {
        if let Some(l) = self.loaded.get(path) {
            return Ok(l.clone());
        }
        let bytes = std::fs::read(path).map_err(|e| ScriptError {
            file: display_path(path),
            line: None,
            message: format!("cannot read the file: {e}"),
            writes: 0,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ScriptError {
            file: display_path(path),
            line: None,
            message: "the file is not valid UTF-8".into(),
            writes: 0,
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let loaded = transpile::load(path, text).map_err(|e| ScriptError {
            file: display_path(path),
            line: Some(e.line),
            message: format!("SyntaxError: {}", e.message),
            writes: 0,
        })?;
        self.loaded.insert(path.to_path_buf(), loaded.clone());
        Ok(loaded)
    }

    /// The source line of printed line `line` (1-based) of `file`.
    fn map_line(&self, file: &Path, line: u32) -> u32 {
        match self.loaded.get(file).and_then(|l| l.lines.as_ref()) {
            Some(lines) if line >= 1 => lines.get(line as usize - 1).copied().unwrap_or(line),
            _ => line,
        }
    }

    fn writes(&self) -> u64 {
        self.mongo.as_ref().map(|m| m.writes).unwrap_or(0)
    }
}

struct FsResolver(Shared);

impl Resolver for FsResolver {
    fn resolve<'js>(&mut self, ctx: &Ctx<'js>, base: &str, name: &str, _attributes: Option<ImportAttributes<'js>>) -> rquickjs::Result<String> {
        let from = file_of(base);
        match modules::resolve(&from, name) {
            Ok(Resolved::Builtin(b)) => Ok(format!("builtin:{b}")),
            Ok(Resolved::File(f)) => Ok(f.display().to_string()),
            Err(why) => {
                self.0.borrow_mut().unresolved = Some((from, name.to_string(), why.clone()));
                Err(Exception::throw_reference(ctx, &why))
            }
        }
    }
}

struct FsLoader(Shared);

impl Loader for FsLoader {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js, rquickjs::module::Declared>> {
        if let Some(b) = name.strip_prefix("builtin:") {
            let names: Vec<String> = ctx.eval::<Function, _>("(n) => __kiln.exportNames(__kiln.builtin(n))")?.call((b,))?;
            let code = reexport(&format!("globalThis.__kiln.builtin({})", json(b)), &names);
            return Module::declare(ctx.clone(), name, code);
        }
        let path = PathBuf::from(name);
        let loaded = self.0.borrow_mut().load(&path);
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => return Err(Exception::throw_syntax(ctx, &e.to_string())),
        };
        match loaded.kind {
            ModuleKind::Esm => Module::declare(ctx.clone(), name, loaded.code),
            ModuleKind::CommonJs | ModuleKind::Json => {
                let names: Vec<String> = ctx.eval::<Function, _>("(p) => __kiln.exportNames(__kiln.requireFile(p))")?.call((name,))?;
                let code = reexport(&format!("globalThis.__kiln.requireFile({})", json(name)), &names);
                Module::declare(ctx.clone(), format!("{name}#esm"), code)
            }
        }
    }
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// An ES module re-exporting the value of `expr` (a CommonJS module's exports).
fn reexport(expr: &str, names: &[String]) -> String {
    let mut code = format!("const m = {expr};\nexport default m;\n");
    if !names.is_empty() {
        code.push_str(&format!("export const {{ {} }} = m;\n", names.join(", ")));
    }
    code
}

/// Where a thrown value points: the first stack frame in a project file.
fn frame_of(stack: &str) -> Option<(PathBuf, u32)> {
    for line in stack.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("at ") else { continue };
        let inner = match (rest.rfind('('), rest.ends_with(')')) {
            (Some(i), true) => &rest[i + 1..rest.len() - 1],
            _ => rest,
        };
        // file:line or file:line:column
        let mut parts = inner.rsplitn(3, ':');
        let a = parts.next()?;
        let b = parts.next();
        let c = parts.next();
        let (file, line_no) = match (a.parse::<u32>(), b.and_then(|b| b.parse::<u32>().ok()), c) {
            (Ok(_col), Some(l), Some(f)) => (f, l),
            (Ok(l), _, _) => (inner[..inner.len() - a.len() - 1].trim_end_matches(':'), l),
            _ => continue,
        };
        // Project files are absolute paths; the prelude and generated modules are not.
        if !file.starts_with('/') {
            continue;
        }
        let file = file.strip_suffix("#esm").unwrap_or(file);
        return Some((file_of(file), line_no));
    }
    None
}

pub(crate) struct Host;

impl Host {
    fn runtime(state: &Shared, limits: Limits) -> Result<(Runtime, Context, Arc<AtomicBool>), ScriptError> {
        let fail = |e: rquickjs::Error| ScriptError {
            file: String::new(),
            line: None,
            message: format!("cannot start the JavaScript engine: {e}"),
            writes: 0,
        };
        let rt = Runtime::new().map_err(fail)?;
        rt.set_memory_limit(limits.memory);
        rt.set_max_stack_size(8 << 20);
        let deadline = state.borrow().deadline;
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            if Instant::now() >= deadline {
                flag.store(true, Ordering::Relaxed);
                true
            } else {
                false
            }
        })));
        rt.set_loader(FsResolver(state.clone()), FsLoader(state.clone()));
        let ctx = Context::full(&rt).map_err(fail)?;
        Ok((rt, ctx, interrupted))
    }

    /// Install the natives and evaluate the prelude.
    fn install(ctx: &Ctx<'_>, state: &Shared) -> rquickjs::Result<()> {
        let n = Object::new(ctx.clone())?;
        let s = state.clone();
        n.set(
            "command",
            Function::new(ctx.clone(), move |ctx: Ctx<'_>, db: String, cmd: String, session: u32| -> rquickjs::Result<String> {
                let mut st = s.borrow_mut();
                let deadline = st.deadline;
                match st.mongo.as_mut() {
                    Some(m) => Ok(m.command(&db, &cmd, session, deadline)),
                    None => Err(Exception::throw_type(
                        &ctx,
                        "there is no database here: a config file (or a module's top level, while kiln checks it) cannot run database commands",
                    )),
                }
            })?,
        )?;
        let s = state.clone();
        n.set(
            "session",
            Function::new(ctx.clone(), move |ctx: Ctx<'_>, op: String, id: u32, opts: String| -> rquickjs::Result<String> {
                let mut st = s.borrow_mut();
                match st.mongo.as_mut() {
                    Some(m) => Ok(m.session(&op, id, &opts)),
                    None => Err(Exception::throw_type(&ctx, "there is no database here: sessions exist only while a migration runs")),
                }
            })?,
        )?;
        n.set(
            "resolve",
            Function::new(ctx.clone(), move |ctx: Ctx<'_>, from: String, spec: String| -> rquickjs::Result<String> {
                match modules::resolve(&file_of(&from), &spec) {
                    Ok(Resolved::Builtin(b)) => Ok(b),
                    Ok(Resolved::File(f)) => Ok(f.display().to_string()),
                    Err(why) => {
                        let e = Exception::from_message(ctx.clone(), &why)?;
                        e.set("code", "MODULE_NOT_FOUND")?;
                        Err(ctx.throw(e.into_value()))
                    }
                }
            })?,
        )?;
        CURRENT.with(|c| *c.borrow_mut() = Some(state.clone()));
        n.set("source", Function::new(ctx.clone(), native_source)?)?;
        n.set("evalScript", Function::new(ctx.clone(), native_eval_script)?)?;
        n.set("importSync", Function::new(ctx.clone(), native_import_sync)?)?;
        let s = state.clone();
        n.set("mapLine", Function::new(ctx.clone(), move |file: String, line: u32| -> u32 { s.borrow().map_line(&file_of(&file), line) })?)?;
        n.set("displayPath", Function::new(ctx.clone(), move |file: String| -> String { display_path(&file_of(&file)) })?)?;
        let s = state.clone();
        n.set(
            "log",
            Function::new(ctx.clone(), move |level: String, text: String| {
                let level = match level.as_str() {
                    "debug" => Level::Debug,
                    "warn" => Level::Warn,
                    "error" => Level::Error,
                    _ => Level::Info,
                };
                let st = s.borrow();
                if let Some(log) = &st.log {
                    log(level, "", &text);
                }
            })?,
        )?;
        let s = state.clone();
        n.set("env", Function::new(ctx.clone(), move || -> String { serde_json::to_string(&s.borrow().env).unwrap_or_else(|_| "{}".into()) })?)?;
        n.set(
            "cwd",
            Function::new(ctx.clone(), move || -> String {
                std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_else(|_| "/".into())
            })?,
        )?;
        n.set(
            "dotenv",
            Function::new(ctx.clone(), move |path: String| -> String {
                let path = if path.is_empty() { PathBuf::from(".env") } else { PathBuf::from(path) };
                let mut out = serde_json::Map::new();
                if let Ok(iter) = dotenvy::from_path_iter(&path) {
                    for (k, v) in iter.flatten() {
                        out.insert(k, serde_json::Value::String(v));
                    }
                }
                serde_json::Value::Object(out).to_string()
            })?,
        )?;
        ctx.globals().set("__kiln_native", n)?;
        ctx.eval::<(), _>(PRELUDE)?;
        Ok(())
    }

    /// Run jobs and timers until `__kiln.outcome` is set; its JSON.
    fn drive(ctx: &Ctx<'_>, deadline: Instant) -> Result<serde_json::Value, Stop> {
        let outcome: Function = ctx
            .eval("() => __kiln.outcome === null || __kiln.outcome === undefined ? '' : JSON.stringify(__kiln.outcome)")
            .map_err(|_| Stop::Stuck)?;
        let next_timer: Function = ctx.eval("() => __kiln.nextTimer()").map_err(|_| Stop::Stuck)?;
        let fire: Function = ctx.eval("() => __kiln.fireTimer()").map_err(|_| Stop::Stuck)?;
        loop {
            while ctx.execute_pending_job() {}
            let text: String = outcome.call(()).map_err(|_| Stop::Stuck)?;
            if !text.is_empty() {
                return serde_json::from_str(&text).map_err(|_| Stop::Stuck);
            }
            if Instant::now() >= deadline {
                return Err(Stop::Timeout);
            }
            let wait: f64 = next_timer.call(()).map_err(|_| Stop::Stuck)?;
            if wait < 0.0 {
                return Err(Stop::Stuck);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(Duration::from_millis(wait as u64).min(remaining));
            if Instant::now() >= deadline {
                return Err(Stop::Timeout);
            }
            if let Err(e) = fire.call::<_, ()>(()).catch(ctx) {
                return Err(Stop::Thrown(caught_json(e)));
            }
        }
    }

    fn new_state(env: BTreeMap<String, String>, limits: Limits, mongo: Option<Mongo>, log: Option<LogSink>) -> Shared {
        Rc::new(RefCell::new(State {
            env,
            loaded: HashMap::new(),
            mongo,
            deadline: Instant::now() + limits.timeout,
            log,
            unresolved: None,
            memory_limit: limits.memory,
        }))
    }

    /// Load the module at `path`: its exports object.
    fn load_main<'js>(ctx: &Ctx<'js>, state: &Shared, path: &Path) -> Result<Value<'js>, ScriptError> {
        let loaded = state.borrow_mut().load(path)?;
        let name = path.display().to_string();
        let result = match loaded.kind {
            ModuleKind::Esm => import_module(ctx, &name, loaded.code).map(|o| o.into_value()),
            _ => ctx.eval::<Function, _>("(p) => __kiln.requireFile(p)").and_then(|f| f.call::<_, Value>((name.as_str(),))),
        };
        result.catch(ctx).map_err(|e| {
            let unresolved = state.borrow_mut().unresolved.take();
            if let Some((from, spec, why)) = unresolved {
                return ScriptError { file: display_path(&from), line: spec_line(&from, &spec), message: why, writes: 0 };
            }
            to_script_error(state, path, caught_json(e), 0)
        })
    }

    pub(crate) fn run_config(path: &Path, mut env: BTreeMap<String, String>, limits: Limits) -> Result<serde_json::Value, ScriptError> {
        if env.is_empty() {
            env = std::env::vars().collect();
        }
        let state = Self::new_state(env, limits, None, None);
        let (_rt, context, interrupted) = Self::runtime(&state, limits)?;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        context.with(|ctx| {
            Self::install(&ctx, &state).map_err(|e| engine_error(&path, e))?;
            let exports = Self::load_main(&ctx, &state, &path)?;
            let settle: Function = ctx.eval("(v) => __kiln.settle(v && v.__esModule === undefined && v[Symbol.toStringTag] === 'Module' ? (v.default !== undefined ? v.default : v) : v)").map_err(|e| engine_error(&path, e))?;
            settle.call::<_, ()>((exports,)).catch(&ctx).map_err(|e| to_script_error(&state, &path, caught_json(e), 0))?;
            let deadline = state.borrow().deadline;
            let outcome = Self::drive(&ctx, deadline).map_err(|s| stop_error(&state, &path, s, &interrupted, limits))?;
            outcome_result(&state, &path, outcome).map(|o| o.get("value").cloned().unwrap_or(serde_json::Value::Null))
        })
    }

    /// Check every module of `paths` in one runtime: the result of each.
    pub(crate) fn check_all(paths: &[PathBuf], limits: Limits) -> Vec<Result<(), ScriptError>> {
        let state = Self::new_state(std::env::vars().collect(), limits, None, None);
        let (_rt, context) = match Self::runtime(&state, limits) {
            Ok((rt, ctx, _)) => (rt, ctx),
            Err(e) => return paths.iter().map(|_| Err(e.clone())).collect(),
        };
        context.with(|ctx| {
            if let Err(e) = Self::install(&ctx, &state) {
                let e = engine_error(Path::new(""), e);
                return paths.iter().map(|_| Err(e.clone())).collect();
            }
            paths
                .iter()
                .map(|p| {
                    let path = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                    Self::check_one(&ctx, &state, &path)
                })
                .collect()
        })
    }

    fn check_one(ctx: &Ctx<'_>, state: &Shared, path: &Path) -> Result<(), ScriptError> {
        {
            let ctx = ctx.clone();
            let exports = Self::load_main(&ctx, state, path)?;
            let check: Function = ctx.eval("(m) => __kiln.checkExports(m)").map_err(|e| engine_error(path, e))?;
            let text: String = check.call((exports,)).catch(&ctx).map_err(|e| to_script_error(state, path, caught_json(e), 0))?;
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let missing: Vec<&str> = ["up", "down"].into_iter().filter(|f| v.get(*f).and_then(|b| b.as_bool()) != Some(true)).collect();
            if !missing.is_empty() {
                return Err(ScriptError {
                    file: display_path(path),
                    line: None,
                    message: format!(
                        "the module exports no {} function{} (migrate-mongo migrations export `up(db, client)` and `down(db, client)`, via module.exports or export)",
                        missing.join(" or "),
                        if missing.len() > 1 { "s" } else { "" }
                    ),
                    writes: 0,
                });
            }
            Ok(())
        }
    }

    pub(crate) fn run_migration(run: Run, handle: tokio::runtime::Handle) -> Result<Report, ScriptError> {
        let mongo = Mongo::new(handle, run.client.clone());
        let state = Self::new_state(std::env::vars().collect(), run.limits, Some(mongo), Some(run.log.clone()));
        let (_rt, context, interrupted) = Self::runtime(&state, run.limits)?;
        let path = std::fs::canonicalize(&run.path).unwrap_or_else(|_| run.path.clone());
        let result = context.with(|ctx| {
            Self::install(&ctx, &state).map_err(|e| engine_error(&path, e))?;
            let exports = Self::load_main(&ctx, &state, &path)?;
            let make: Function = ctx.eval("(n) => __kiln.makeClient(n)").map_err(|e| engine_error(&path, e))?;
            let pair: Object = make.call((run.database.as_str(),)).map_err(|e| engine_error(&path, e))?;
            let db: Value = pair.get("db").map_err(|e| engine_error(&path, e))?;
            let client: Value = pair.get("client").map_err(|e| engine_error(&path, e))?;
            let start: Function = ctx.eval("(m, f, db, c) => __kiln.start(m, f, db, c)").map_err(|e| engine_error(&path, e))?;
            if let Err(e) = start.call::<_, ()>((exports, run.function.as_str(), db, client)).catch(&ctx) {
                let writes = state.borrow().writes();
                if interrupted.load(Ordering::Relaxed) {
                    return Err(stop_error(&state, &path, Stop::Thrown(caught_json(e)), &interrupted, run.limits));
                }
                return Err(to_script_error(&state, &path, caught_json(e), writes));
            }
            let deadline = state.borrow().deadline;
            let outcome = Self::drive(&ctx, deadline).map_err(|s| stop_error(&state, &path, s, &interrupted, run.limits))?;
            outcome_result(&state, &path, outcome).map(|_| ())
        });
        let st = state.borrow();
        let (commands, writes) = st.mongo.as_ref().map(|m| (m.commands, m.writes)).unwrap_or((0, 0));
        result.map(|()| Report { commands, writes }).map_err(|mut e| {
            e.writes = writes;
            e
        })
    }
}

thread_local! {
    /// The state of the evaluation running on this thread (natives that
    /// return JavaScript values are plain functions, and reach it here).
    static CURRENT: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

fn current() -> Option<Shared> {
    CURRENT.with(|c| c.borrow().clone())
}

fn native_source<'js>(ctx: Ctx<'js>, path: String) -> rquickjs::Result<Object<'js>> {
    let Some(state) = current() else { return Err(Exception::throw_internal(&ctx, "kiln: no evaluation on this thread")) };
    let loaded = state.borrow_mut().load(Path::new(&path));
    match loaded {
        Ok(l) => {
            let o = Object::new(ctx.clone())?;
            o.set(
                "kind",
                match l.kind {
                    ModuleKind::Esm => "esm",
                    ModuleKind::CommonJs => "cjs",
                    ModuleKind::Json => "json",
                },
            )?;
            o.set("code", l.code)?;
            Ok(o)
        }
        Err(e) => {
            let ex = Exception::from_message(ctx.clone(), &e.message)?;
            ex.set("kilnFile", e.file)?;
            ex.set("kilnLine", e.line)?;
            Err(ctx.throw(ex.into_value()))
        }
    }
}

/// CommonJS: the module's code inside Node's wrapper function, on the same
/// first line so line numbers stay the file's, evaluated under its file name.
fn native_eval_script<'js>(ctx: Ctx<'js>, path: String, code: String) -> rquickjs::Result<Function<'js>> {
    let wrapped = format!("(function (exports, require, module, __filename, __dirname) {{{code}\n}})");
    let mut opts = EvalOptions::default();
    opts.strict = false;
    opts.filename = Some(path);
    ctx.eval_with_options(wrapped, opts)
}

fn native_import_sync<'js>(ctx: Ctx<'js>, path: String) -> rquickjs::Result<Object<'js>> {
    let Some(state) = current() else { return Err(Exception::throw_internal(&ctx, "kiln: no evaluation on this thread")) };
    let loaded = state.borrow_mut().load(Path::new(&path));
    match loaded {
        Ok(l) => import_module(&ctx, &path, l.code),
        Err(e) => Err(Exception::throw_syntax(&ctx, &e.to_string())),
    }
}

/// Evaluate the ES module at `path` (declared under that name) and return its namespace.
fn import_module<'js>(ctx: &Ctx<'js>, name: &str, code: String) -> rquickjs::Result<Object<'js>> {
    let m = Module::declare(ctx.clone(), name, code)?;
    let (m, promise) = m.eval()?;
    promise.finish::<()>()?;
    m.namespace()
}

/// The line of `file` where the specifier `spec` is written (for an import that does not resolve).
fn spec_line(file: &Path, spec: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    let quoted = [format!("'{spec}'"), format!("\"{spec}\""), format!("`{spec}`")];
    text.lines().position(|l| quoted.iter().any(|q| l.contains(q.as_str()))).map(|i| i as u32 + 1)
}

enum Stop {
    /// The deadline passed.
    Timeout,
    /// No outcome, no job and no timer: the promise can never settle.
    Stuck,
    /// A timer callback threw.
    Thrown(serde_json::Value),
}

fn engine_error(path: &Path, e: rquickjs::Error) -> ScriptError {
    ScriptError { file: display_path(path), line: None, message: format!("the JavaScript engine failed: {e}"), writes: 0 }
}

/// A caught JavaScript error as `{name, message, stack, code}`.
fn caught_json(e: CaughtError<'_>) -> serde_json::Value {
    match e {
        CaughtError::Exception(ex) => {
            let obj = ex.as_object();
            let get = |k: &str| obj.get::<_, Option<String>>(k).ok().flatten();
            serde_json::json!({
                "name": get("name").unwrap_or_else(|| "Error".into()),
                "message": ex.message().unwrap_or_default(),
                "stack": ex.stack().unwrap_or_default(),
                "code": get("code"),
                "kilnFile": get("kilnFile"),
                "kilnLine": obj.get::<_, Option<u32>>("kilnLine").ok().flatten(),
            })
        }
        CaughtError::Value(v) => {
            let text = v.as_string().and_then(|s| s.to_string().ok()).unwrap_or_else(|| format!("{v:?}"));
            serde_json::json!({ "name": "Error", "message": format!("a non-Error value was thrown: {text}"), "stack": "" })
        }
        CaughtError::Error(e) => serde_json::json!({ "name": "Error", "message": e.to_string(), "stack": "" }),
    }
}

fn to_script_error(state: &Shared, main: &Path, error: serde_json::Value, writes: u64) -> ScriptError {
    let text = |k: &str| error.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let name = text("name");
    let mut message = text("message");
    if !name.is_empty() && name != "Error" {
        message = format!("{name}: {message}");
    }
    if let Some(code) = error.get("code").and_then(|c| c.as_str().map(str::to_string).or_else(|| c.as_i64().map(|n| n.to_string()))) {
        if name.starts_with("Mongo") {
            let code_name = text("codeName");
            message = if code_name.is_empty() { format!("{message} (code {code})") } else { format!("{message} (code {code}, {code_name})") };
        }
    }
    if let Some(file) = error.get("kilnFile").and_then(|f| f.as_str()) {
        let line = error.get("kilnLine").and_then(|l| l.as_u64()).map(|l| l as u32);
        return ScriptError { file: file.to_string(), line, message, writes };
    }
    match frame_of(&text("stack")) {
        Some((file, line)) => {
            let line = state.borrow().map_line(&file, line);
            ScriptError { file: display_path(&file), line: Some(line), message, writes }
        }
        None => ScriptError { file: display_path(main), line: None, message, writes },
    }
}

fn stop_error(state: &Shared, main: &Path, stop: Stop, interrupted: &AtomicBool, limits: Limits) -> ScriptError {
    let writes = state.borrow().writes();
    match stop {
        Stop::Thrown(e) if !interrupted.load(Ordering::Relaxed) => to_script_error(state, main, e, writes),
        Stop::Thrown(e) => {
            let mut err = to_script_error(state, main, e, writes);
            err.message = timeout_message(limits);
            err
        }
        Stop::Timeout => ScriptError { file: display_path(main), line: None, message: timeout_message(limits), writes },
        Stop::Stuck if interrupted.load(Ordering::Relaxed) => ScriptError { file: display_path(main), line: None, message: timeout_message(limits), writes },
        Stop::Stuck => ScriptError {
            file: display_path(main),
            line: None,
            message: format!(
                "the migration's promise never settled: nothing was left to run (no pending callback or timer), or the script ran out of memory (limit {} MiB, [javascript] memory_limit in kiln.toml). Check that every promise it creates is resolved and awaited",
                limits.memory >> 20
            ),
            writes,
        },
    }
}

fn timeout_message(limits: Limits) -> String {
    format!(
        "interrupted: the migration ran longer than its time-out of {} s (a runaway loop, or a long operation); raise [javascript] timeout in kiln.toml if it needs longer",
        limits.timeout.as_secs_f64()
    )
}

fn outcome_result(state: &Shared, main: &Path, outcome: serde_json::Value) -> Result<serde_json::Value, ScriptError> {
    if outcome.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        return Ok(outcome);
    }
    let error = outcome.get("error").cloned().unwrap_or_default();
    let writes = state.borrow().writes();
    if error.get("outOfMemory").and_then(|m| m.as_bool()) == Some(true) {
        let limit = state.borrow().memory_limit;
        return Err(ScriptError {
            file: display_path(main),
            line: None,
            message: format!(
                "the script ran out of memory (limit {} MiB; raise [javascript] memory_limit_mb in kiln.toml if it needs more), or threw null",
                limit >> 20
            ),
            writes,
        });
    }
    if error.get("missing").and_then(|m| m.as_bool()) == Some(true) {
        return Err(ScriptError {
            file: display_path(main),
            line: None,
            message: error.get("message").and_then(|m| m.as_str()).unwrap_or("").to_string(),
            writes,
        });
    }
    Err(to_script_error(state, main, error, writes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_frames() {
        let s = "    at up (/p/m/2024-a.js:12:9)\n    at <anonymous> (<kiln prelude>:3)\n";
        assert_eq!(frame_of(s), Some((PathBuf::from("/p/m/2024-a.js"), 12)));
        let s = "    at insertOne (<input>:300:20)\n    at up (/p/m/a.js#cjs:7)\n";
        assert_eq!(frame_of(s), Some((PathBuf::from("/p/m/a.js"), 7)));
        assert_eq!(frame_of("    at /p/x.ts:4:2\n"), Some((PathBuf::from("/p/x.ts"), 4)));
    }
}
