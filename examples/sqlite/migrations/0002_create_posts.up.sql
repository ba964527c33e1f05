-- kiln:depends 0001_create_users
CREATE TABLE posts (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    title      TEXT NOT NULL,
    body       TEXT NOT NULL DEFAULT '',
    updated_at TEXT
);
CREATE INDEX posts_user_id_idx ON posts (user_id);
