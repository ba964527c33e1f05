-- kiln:up
CREATE TABLE assistants (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, voice TEXT);
-- kiln:down
DROP TABLE assistants;
