-- kiln:depends 0001_create_users
-- kiln:depends 0002_create_assistants
-- kiln:depends 0003_create_clients
-- kiln:depends 0004_create_schedules
-- kiln:up
CREATE TABLE calls (
    id BIGSERIAL PRIMARY KEY,
    schedule_id BIGINT NOT NULL REFERENCES schedules (id),
    started_at TIMESTAMPTZ,
    duration_s INT
);
-- kiln:down
DROP TABLE calls;
