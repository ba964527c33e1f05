//! Contract parsing and validation tests.

use super::*;

fn users() -> Snapshot {
    let mut o = ObjectInfo::default();
    o.columns.insert("id".into(), ColumnInfo { data_type: "bigint".into(), nullable: false });
    o.columns.insert("email".into(), ColumnInfo { data_type: "character varying(255)".into(), nullable: false });
    o.indexes.insert("users_email_key".into(), IndexInfo { columns: vec!["email".into()], unique: true, options: None });
    let mut s = Snapshot::default();
    s.objects.insert("users".into(), o);
    s
}

#[test]
fn parse_and_validate() {
    let c = Contract::parse(
        "tables:\n  users:\n    required: [id, {name: email, type: varchar(255), nullable: false}]\n    optional: [avatar]\n    indexes: [users_email_key]\n    unique: [[email]]\n",
        "schema.yaml",
    )
    .unwrap();
    let v = validate(&c, &users());
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].severity, Severity::Warning);
    assert!(v[0].message.contains("avatar"));
}

#[test]
fn missing_required_is_error() {
    let c = Contract::parse("tables:\n  users:\n    required: [id, created_at]\n  orders:\n    required: [id]\n", "s").unwrap();
    let v = validate(&c, &users());
    assert!(has_errors(&v));
    assert!(v.iter().any(|x| x.message.contains("created_at")));
    assert!(v.iter().any(|x| x.object == "orders" && x.message.contains("missing")));
}

#[test]
fn type_and_nullability() {
    let c = Contract::parse("tables:\n  users:\n    required: [{name: id, type: int8}, {name: email, nullable: true}]\n", "s").unwrap();
    let v = validate(&c, &users());
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].message.contains("NOT NULL"));
}

#[test]
fn unknown_key_names_line() {
    let e = Contract::parse("tables:\n  users:\n    requird: [id]\n", "schema.yaml").unwrap_err();
    assert_eq!(e.file, "schema.yaml");
    assert!(e.message.contains("requird"));
}

#[test]
fn collections() {
    let mut s = Snapshot::default();
    let mut o = ObjectInfo::default();
    o.indexes.insert("email_1".into(), IndexInfo { columns: vec!["email".into()], unique: true, options: None });
    o.validator = Some(ValidatorInfo { required: vec!["email".into()], json: "{}".into() });
    s.objects.insert("users".into(), o);
    let c =
        Contract::parse("collections:\n  users:\n    required: [email, name]\n    indexes: [email_1, {keys: {email: 1}}, {keys: {age: -1}}]\n", "s")
            .unwrap();
    let v = validate(&c, &s);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v.iter().any(|x| x.message.contains("name")));
    assert!(v.iter().any(|x| x.message.contains("age:-1")));
}

#[test]
fn diffs() {
    let a = users();
    let mut b = users();
    b.objects.get_mut("users").unwrap().indexes.insert("by_hand".into(), IndexInfo { columns: vec!["id".into()], unique: false, options: None });
    b.objects.get_mut("users").unwrap().columns.remove("email");
    let d = diff(&a, &b);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d.iter().any(|c| c.kind == "added" && c.what == "index by_hand"));
    assert!(d.iter().any(|c| c.kind == "removed" && c.what == "column email"));
    assert!(diff(&a, &a).is_empty());
    // an implicitly created MongoDB collection is not drift
    let mut c = a.clone();
    let mut coll = ObjectInfo::default();
    coll.indexes.insert("_id_".into(), IndexInfo { columns: vec!["_id".into()], unique: true, options: None });
    c.objects.insert("events".into(), coll);
    assert!(diff(&a, &c).is_empty());
    assert!(diff(&c, &a).is_empty());
}

#[test]
fn dump_round_trips_through_validation() {
    let s = users();
    let c = dump(&s, false);
    let text = c.to_yaml();
    let back = Contract::parse(&text, "dump").unwrap();
    assert!(validate(&back, &s).is_empty(), "{text}");
}

#[test]
fn regressions_only_count_what_was_satisfied() {
    let c = Contract::parse("tables:\n  users:\n    required: [id, email]\n    indexes: [users_email_key]\n", "s").unwrap();
    let empty = Snapshot::default();
    // creating the table without email yet is progress, not a regression
    let mut partial = users();
    partial.objects.get_mut("users").unwrap().columns.remove("email");
    partial.objects.get_mut("users").unwrap().indexes.clear();
    assert!(regressions(&c, &empty, &partial).is_empty());
    // dropping a required column that existed is a regression
    let full = users();
    let r = regressions(&c, &full, &partial);
    assert!(r.iter().any(|v| v.message.contains("email")), "{r:?}");
    assert!(r.iter().any(|v| v.message.contains("users_email_key")), "{r:?}");
    assert!(regressions(&c, &full, &full).is_empty());
}

#[test]
fn type_synonyms() {
    assert_eq!(normalise_type("INT8"), normalise_type("bigint"));
    assert_eq!(normalise_type("varchar(20)"), normalise_type("character varying(20)"));
    assert_eq!(normalise_type("int(11)"), normalise_type("integer"));
    assert_ne!(normalise_type("text"), normalise_type("bigint"));
}

#[test]
fn deep_nesting_is_refused_before_the_parser_with_its_line() {
    let text = format!("tables:\n  users: {}\n", "{a: ".repeat(50_000));
    let t = std::time::Instant::now();
    let e = Contract::parse(&text, "schema.yaml").unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "took {:?}", t.elapsed());
    assert_eq!(e.line, 2);
    assert!(e.to_string().starts_with("schema.yaml:2: nested more than 64 levels"), "{e}");
    // A byte-order mark is not an error.
    assert!(Contract::parse("\u{feff}tables: {}\n", "schema.yaml").is_ok());
}
