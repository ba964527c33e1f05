-- Runs in every tenant's schema (the search path is the tenant's schema).
-- kiln:up
CREATE TABLE users (
    id         bigserial PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- kiln:down
DROP TABLE users;
