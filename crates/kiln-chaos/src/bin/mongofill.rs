//! Data for the MongoDB zero-downtime benchmark (bench/zdt-mongo-bench.sh).
//!
//! ```text
//! mongofill URL fill N        # N users {_id: i, fullName, email}, inserted 10,000 at a time
//! mongofill URL update        # one updateMany: displayName = fullName (pipeline), timed
//! mongofill URL left          # documents whose displayName differs from fullName
//! ```
//! Prints one JSON line.

use mongodb::bson::doc;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(cmd)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: mongofill URL fill N | update | left");
        std::process::exit(2)
    };
    let client = mongodb::Client::with_uri_str(url).await.expect("connect");
    let users = client.default_database().expect("a database in the URL").collection::<mongodb::bson::Document>("users");
    let t = std::time::Instant::now();
    match cmd.as_str() {
        "fill" => {
            let n: i64 = args.get(3).and_then(|s| s.parse().ok()).expect("fill N");
            let mut i = 1;
            while i <= n {
                let end = (i + 10_000).min(n + 1);
                let docs: Vec<_> =
                    (i..end).map(|k| doc! { "_id": k, "fullName": format!("user number {k}"), "email": format!("{k}@example.com") }).collect();
                users.insert_many(docs).await.expect("insert");
                i = end;
            }
            println!("{{\"inserted\": {n}, \"secs\": {:.2}}}", t.elapsed().as_secs_f64());
        }
        "update" => {
            let r = users
                .update_many(doc! { "displayName": { "$exists": false } }, vec![doc! { "$set": { "displayName": "$fullName" } }])
                .await
                .expect("updateMany");
            println!("{{\"modified\": {}, \"secs\": {:.3}}}", r.modified_count, t.elapsed().as_secs_f64());
        }
        "left" => {
            let n = users.count_documents(doc! { "$expr": { "$ne": ["$displayName", "$fullName"] } }).await.expect("count");
            println!("{{\"left\": {n}}}");
        }
        other => {
            eprintln!("unknown command {other}");
            std::process::exit(2)
        }
    }
}
