-- kiln:up
CREATE TABLE clients (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, phone TEXT);
-- kiln:down
DROP TABLE clients;
