
CREATE FUNCTION touch() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
  new.name := lower(new.name);
  return new;
end;
$$;

CREATE TABLE accounts (
    id integer NOT NULL,
    name text
);

CREATE TABLE gorp_migrations (
    id text NOT NULL,
    applied_at timestamp with time zone
);

INSERT INTO gorp_migrations VALUES ('1_init.sql', '2026-12-02 00:56:35.129313+00');
INSERT INTO gorp_migrations VALUES ('2_index.sql', '2026-12-02 00:56:35.151676+00');

ALTER TABLE ONLY accounts
    ADD CONSTRAINT accounts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY gorp_migrations
    ADD CONSTRAINT gorp_migrations_pkey PRIMARY KEY (id);

CREATE INDEX accounts_name ON accounts USING btree (name);

