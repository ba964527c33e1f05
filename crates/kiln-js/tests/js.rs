//! migrate-mongo migrations run on kiln's embedded engine against the MongoDB
//! test server: module systems, TypeScript, the driver API, errors with
//! their file and line, limits, and module resolution.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_js::{Level, Limits, Run, ScriptError};
use kiln_testkit::{Engine, TestDb};
use mongodb::bson::{doc, Bson, Document};

struct Case {
    db: TestDb,
    dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Case {
    async fn new() -> Case {
        Case { db: TestDb::new(Engine::Mongodb).await, dir: tempfile::tempdir().unwrap(), logs: Arc::default() }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    async fn run_with(&self, file: &str, function: &str, limits: Limits) -> Result<kiln_js::Report, ScriptError> {
        let client = kiln_testkit::mongo::client(&self.db.url).await;
        let logs = self.logs.clone();
        let log: kiln_js::LogSink = Arc::new(move |level: Level, _file: &str, text: &str| logs.lock().unwrap().push(format!("{level:?}: {text}")));
        kiln_js::run_migration(Run {
            path: self.dir.path().join(file),
            function: function.into(),
            client,
            database: kiln_testkit::mongo::database(&self.db.url).await.name().to_string(),
            limits,
            log,
        })
        .await
    }

    async fn run(&self, file: &str, function: &str) -> Result<kiln_js::Report, ScriptError> {
        self.run_with(file, function, Limits::default()).await
    }

    async fn docs(&self, coll: &str) -> Vec<Document> {
        kiln_testkit::mongo::documents(&self.db.url, coll).await
    }
}

#[tokio::test]
async fn commonjs_esm_and_typescript_modules_run_up_and_down() {
    let c = Case::new().await;
    c.write(
        "m/1-cjs.js",
        "module.exports = {\n  async up(db, client) {\n    await db.collection('a').insertOne({ _id: 1, kind: 'cjs' });\n  },\n  async down(db) {\n    await db.collection('a').deleteOne({ _id: 1 });\n  },\n};\n",
    );
    c.write("m/2-esm.mjs", "export const up = async (db) => { await db.collection('a').insertOne({ _id: 2, kind: 'esm' }); };\nexport const down = async (db) => { await db.collection('a').deleteOne({ _id: 2 }); };\n");
    c.write(
        "m/3-esm-default.js",
        "export default {\n  up: async (db) => { await db.collection('a').insertOne({ _id: 3, kind: 'default' }); },\n  down: async (db) => { await db.collection('a').deleteOne({ _id: 3 }); },\n};\n",
    );
    c.write(
        "m/4-ts.ts",
        "import { Db, MongoClient } from 'mongodb';\n\ninterface Doc { _id: number; kind: string }\nenum Kind { Ts = 'ts' }\n\nexport async function up(db: Db, client: MongoClient): Promise<void> {\n  const doc: Doc = { _id: 4, kind: Kind.Ts };\n  await db.collection<Doc>('a').insertOne(doc as Doc);\n}\n\nexport async function down(db: Db): Promise<void> {\n  await db.collection('a').deleteOne({ _id: 4 });\n}\n",
    );
    // migrate-mongo before 7: a callback instead of a promise.
    c.write("m/5-callback.js", "module.exports = {\n  up(db, next) { db.collection('a').insertOne({ _id: 5, kind: 'callback' }).then(() => next(), next); },\n  down(db, next) { db.collection('a').deleteOne({ _id: 5 }).then(() => next(), next); },\n};\n");
    for f in ["m/1-cjs.js", "m/2-esm.mjs", "m/3-esm-default.js", "m/4-ts.ts", "m/5-callback.js"] {
        let r = c.run(f, "up").await.unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(r.writes, 1, "{f}");
    }
    let kinds: Vec<String> = c.docs("a").await.iter().map(|d| d.get_str("kind").unwrap().to_string()).collect();
    assert_eq!(kinds, vec!["cjs", "esm", "default", "ts", "callback"]);
    for f in ["m/1-cjs.js", "m/2-esm.mjs", "m/3-esm-default.js", "m/4-ts.ts", "m/5-callback.js"] {
        c.run(f, "down").await.unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    assert!(c.docs("a").await.is_empty());
}

#[tokio::test]
async fn the_driver_api_migrations_use() {
    let c = Case::new().await;
    c.write(
        "api.js",
        r#"
const { ObjectId, Long, Decimal128 } = require('mongodb');
const assert = require('assert');
module.exports = {
  async up(db, client) {
    const people = db.collection('people');
    const id = new ObjectId();
    const one = await people.insertOne({ _id: id, name: 'Ada', born: new Date('1815-12-10T00:00:00Z'), big: Long.fromString('9007199254740993'), price: Decimal128.fromString('19.99') });
    assert.ok(one.insertedId.equals(id));
    const many = await people.insertMany([{ name: 'Grace', age: 85 }, { name: 'Linus', age: 54 }, { name: 'Barbara', age: 40 }]);
    assert.strictEqual(many.insertedCount, 3);
    assert.ok(many.insertedIds[0] instanceof ObjectId);
    const upd = await people.updateOne({ name: 'Grace' }, { $set: { field: 'cs' } });
    assert.strictEqual(upd.matchedCount, 1); assert.strictEqual(upd.modifiedCount, 1);
    const pipe = await people.updateMany({ age: { $exists: true } }, [{ $set: { decade: { $floor: { $divide: ['$age', 10] } } } }]);
    assert.strictEqual(pipe.modifiedCount, 3);
    const ups = await people.updateOne({ name: 'Ken' }, { $set: { age: 1 } }, { upsert: true });
    assert.strictEqual(ups.upsertedCount, 1);
    const rep = await people.replaceOne({ name: 'Ken' }, { name: 'Ken', age: 2 });
    assert.strictEqual(rep.modifiedCount, 1);
    const sorted = await people.find({ age: { $gt: 10 } }).sort({ age: -1 }).limit(2).project({ _id: 0, name: 1 }).toArray();
    assert.deepStrictEqual(sorted.map(p => p.name), ['Grace', 'Linus']);
    let seen = 0;
    await people.find({}, { batchSize: 2 }).forEach(() => { seen++; });
    assert.strictEqual(seen, 5);
    const cursor = people.find({ age: { $exists: true } }).sort('age');
    let names = [];
    while (await cursor.hasNext()) names.push((await cursor.next()).name);
    assert.deepStrictEqual(names, ['Ken', 'Barbara', 'Linus', 'Grace']);
    for await (const p of people.find({ name: 'Ada' })) assert.strictEqual(p.big.toString(), '9007199254740993');
    const ada = await people.findOne({ _id: id });
    assert.ok(ada.born instanceof Date && ada.born.getUTCFullYear() === 1815);
    assert.strictEqual(ada.price.toString(), '19.99');
    const agg = await people.aggregate([{ $match: { age: { $gt: 10 } } }, { $group: { _id: null, total: { $sum: '$age' } } }]).toArray();
    assert.strictEqual(agg[0].total, 179);
    assert.strictEqual(await people.countDocuments({ age: { $gt: 50 } }), 2);
    assert.deepStrictEqual((await people.distinct('decade')).sort(), [4, 5, 8]);
    const bulk = await people.bulkWrite([
      { insertOne: { document: { name: 'Tim' } } },
      { updateMany: { filter: { name: 'Tim' }, update: { $set: { web: true } } } },
      { deleteOne: { filter: { name: 'Ken' } } },
    ]);
    assert.strictEqual(bulk.insertedCount, 1); assert.strictEqual(bulk.modifiedCount, 1); assert.strictEqual(bulk.deletedCount, 1);
    const del = await people.deleteMany({ web: true });
    assert.strictEqual(del.deletedCount, 1);
    const name = await people.createIndex({ name: 1, age: -1 }, { unique: false });
    assert.strictEqual(name, 'name_1_age_-1');
    await people.createIndexes([{ key: { decade: 1 }, name: 'by_decade' }]);
    assert.deepStrictEqual((await people.indexes()).map(i => i.name).sort(), ['_id_', 'by_decade', 'name_1_age_-1']);
    await people.dropIndex('by_decade');
    await people.dropIndexes();
    assert.deepStrictEqual((await people.indexes()).map(i => i.name), ['_id_']);
    await db.createCollection('logs', { validator: { $jsonSchema: { bsonType: 'object', required: ['at'] } } });
    const colls = (await db.listCollections({}, { nameOnly: true }).toArray()).map(c => c.name).sort();
    assert.deepStrictEqual(colls, ['logs', 'people']);
    await db.collection('logs').rename('events');
    await db.renameCollection('events', 'journal');
    const ping = await db.command({ ping: 1 });
    assert.strictEqual(ping.ok, 1);
    await db.collection('journal').drop();
    await db.dropCollection('nope'); // MongoDB 7+: true, before: false; never a throw
    console.log('done with %d people', await people.countDocuments());
  },
  async down(db) { await db.dropCollection('people'); },
};
"#,
    );
    let r = c.run("api.js", "up").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(r.writes > 10, "{r:?}");
    assert_eq!(c.logs.lock().unwrap().last().map(String::as_str), Some("Info: done with 4 people"));
    let ada = c.docs("people").await.into_iter().find(|d| d.get_str("name").ok() == Some("Ada")).unwrap();
    assert_eq!(ada.get("big"), Some(&Bson::Int64(9007199254740993)));
    assert!(matches!(ada.get("price"), Some(Bson::Decimal128(_))));
    assert!(matches!(ada.get("born"), Some(Bson::DateTime(_))));
    assert_eq!(kiln_testkit::mongo::collection_names(&c.db.url).await, vec!["people"]);
}

#[tokio::test]
async fn transactions_with_sessions() {
    let c = Case::new().await;
    kiln_testkit::mongo::database(&c.db.url).await.create_collection("acc").await.unwrap();
    c.write(
        "tx.js",
        "module.exports = { async up(db, client) {\n  const session = client.startSession();\n  try {\n    await session.withTransaction(async () => {\n      await db.collection('acc').insertOne({ _id: 1, n: 1 }, { session });\n      await db.collection('acc').updateOne({ _id: 1 }, { $inc: { n: 1 } }, { session });\n    });\n  } finally {\n    await session.endSession();\n  }\n}, async down() {} };\n",
    );
    c.run("tx.js", "up").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.docs("acc").await, vec![doc! { "_id": 1, "n": 2 }]);
}

#[tokio::test]
async fn a_failing_script_names_its_file_line_and_what_it_wrote() {
    let c = Case::new().await;
    c.write(
        "fail.ts",
        "import { Db } from 'mongodb';\n\ntype T = { a: number };\n\nexport const up = async (db: Db) => {\n  await db.collection('u').insertOne({ _id: 1 });\n  const t: T = { a: 1 };\n  if (t.a === 1) {\n    throw new Error('boom at nine');\n  }\n};\nexport const down = async () => {};\n",
    );
    let e = c.run("fail.ts", "up").await.unwrap_err();
    assert_eq!(e.line, Some(9), "{e}");
    assert!(e.file.ends_with("fail.ts") && e.message.contains("boom at nine"), "{e}");
    assert_eq!(e.writes, 1);

    c.write("dup.js", "module.exports = { async up(db) {\n  await db.collection('u').insertOne({ _id: 1 });\n}, async down() {} };\n");
    let e = c.run("dup.js", "up").await.unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("E11000") && e.message.contains("11000"), "{e}");

    c.write("missing.js", "module.exports = { async up(db) {\n  await db.collection('u').mapReduce(() => {}, () => {});\n}, async down() {} };\n");
    let e = c.run("missing.js", "up").await.unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("mapReduce") && e.message.contains("not provided"), "{e}");
    assert_eq!(e.writes, 0);

    c.write("nodown.js", "module.exports = { async up() {} };\n");
    let e = c.run("nodown.js", "down").await.unwrap_err();
    assert!(e.message.contains("no down() function"), "{e}");
}

#[tokio::test]
async fn a_runaway_loop_is_interrupted() {
    let c = Case::new().await;
    c.write("loop.js", "module.exports = { async up(db) {\n  await db.command({ ping: 1 });\n  for (;;) {}\n}, async down() {} };\n");
    let started = std::time::Instant::now();
    let e = c.run_with("loop.js", "up", Limits { timeout: Duration::from_millis(800), ..Limits::default() }).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(e.message.contains("interrupted") && e.message.contains("time-out"), "{e}");
    assert_eq!(e.writes, 0);

    c.write("hog.js", "module.exports = { async up() {\n  const a = [];\n  for (;;) a.push('x'.repeat(1024));\n}, async down() {} };\n");
    let e = c.run_with("hog.js", "up", Limits { memory: 32 << 20, ..Limits::default() }).await.unwrap_err();
    assert!(e.message.contains("memory"), "{e}");
}

#[tokio::test]
async fn relative_helpers_and_missing_packages() {
    let c = Case::new().await;
    c.write("lib/names.js", "exports.collection = 'helped';\nexports.doc = (n) => ({ n });\n");
    c.write("lib/esm.ts", "export const twice = (n: number): number => n * 2;\n");
    c.write(
        "migrations/1-helper.js",
        "const { collection, doc } = require('../lib/names');\nconst path = require('path');\nmodule.exports = { async up(db) {\n  const { twice } = require('../lib/esm');\n  await db.collection(collection).insertOne(doc(twice(21)));\n}, async down() {} };\n",
    );
    c.run("migrations/1-helper.js", "up").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.docs("helped").await[0].get_i32("n").unwrap(), 42);

    c.write("migrations/2-npm.js", "const _ = require('lodash');\nmodule.exports = { async up() {}, async down() {} };\n");
    let e = kiln_js::check_migration(&c.dir.path().join("migrations/2-npm.js"), Limits::default()).unwrap_err();
    assert_eq!(e.line, Some(1), "{e}");
    assert!(e.message.contains("'lodash'") && e.message.contains("npm install"), "{e}");

    c.write("migrations/3-esm-npm.mjs", "import dayjs from 'dayjs';\nexport const up = async () => {};\nexport const down = async () => {};\n");
    let e = kiln_js::check_migration(&c.dir.path().join("migrations/3-esm-npm.mjs"), Limits::default()).unwrap_err();
    assert_eq!(e.line, Some(1), "{e}");
    assert!(e.message.contains("'dayjs'"), "{e}");

    // A pure-JavaScript package that is installed loads.
    c.write("node_modules/tiny/package.json", r#"{"name": "tiny", "main": "main.js"}"#);
    c.write("node_modules/tiny/main.js", "module.exports = { shout: (s) => s.toUpperCase() };\n");
    c.write("migrations/4-pkg.js", "const { shout } = require('tiny');\nmodule.exports = { async up(db) { await db.collection('pkg').insertOne({ s: shout('hi') }); }, async down() {} };\n");
    kiln_js::check_migration(&c.dir.path().join("migrations/4-pkg.js"), Limits::default()).unwrap();
    c.run("migrations/4-pkg.js", "up").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.docs("pkg").await[0].get_str("s").unwrap(), "HI");
}

#[test]
fn config_files_commonjs_esm_promise_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("migrate-mongo-config.js");
    std::fs::write(
        &p,
        "require('dotenv').config();\nmodule.exports = { mongodb: { url: process.env.MM_URL, databaseName: process.env.MM_DB || 'fallback' }, migrationsDir: 'db/migrations', changelogCollectionName: 'changes', migrationFileExtension: '.ts', useFileHash: true };\n",
    )
    .unwrap();
    let env = [("MM_URL".to_string(), "mongodb://h:1".to_string())].into_iter().collect();
    let cfg = kiln_js::read_config(&p, env, Limits::default()).unwrap();
    assert_eq!(cfg.url.as_deref(), Some("mongodb://h:1"));
    assert_eq!(cfg.database.as_deref(), Some("fallback"));
    assert_eq!(
        (cfg.migrations_dir.as_str(), cfg.changelog.as_str(), cfg.extension.as_str(), cfg.use_file_hash),
        ("db/migrations", "changes", ".ts", true)
    );

    std::fs::write(&p, "const config = { mongodb: { url: 'mongodb://e:2', databaseName: 'esm' } };\nexport default config;\n").unwrap();
    let cfg = kiln_js::read_config(&p, Default::default(), Limits::default()).unwrap();
    assert_eq!((cfg.url.as_deref(), cfg.migrations_dir.as_str(), cfg.changelog.as_str()), (Some("mongodb://e:2"), "migrations", "changelog"));

    std::fs::write(&p, "module.exports = Promise.resolve({ mongodb: { url: 'mongodb://p:3', databaseName: 'p' } });\n").unwrap();
    assert_eq!(kiln_js::read_config(&p, Default::default(), Limits::default()).unwrap().database.as_deref(), Some("p"));

    std::fs::write(&p, "module.exports = {\n  mongodb: { url: undefinedThing },\n};\n").unwrap();
    let e = kiln_js::read_config(&p, Default::default(), Limits::default()).unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("undefinedThing"), "{e}");
}

#[allow(dead_code)]
fn _assert_path(_: &Path) {}
