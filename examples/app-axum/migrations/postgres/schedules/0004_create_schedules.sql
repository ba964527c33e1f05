-- kiln:depends 0001_create_users
-- kiln:depends 0002_create_assistants
-- kiln:depends 0003_create_clients
-- kiln:up
CREATE TABLE schedules (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users (id),
    assistant_id BIGINT NOT NULL REFERENCES assistants (id),
    client_id BIGINT NOT NULL REFERENCES clients (id),
    at TIMESTAMPTZ NOT NULL
);
CREATE INDEX schedules_at ON schedules (at);
-- kiln:down
DROP TABLE schedules;
