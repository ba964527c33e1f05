CREATE TABLE items (id bigserial PRIMARY KEY, title text NOT NULL);
