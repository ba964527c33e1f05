
CREATE TABLE schema_migrations (
    version character varying NOT NULL
);

CREATE TABLE users (
    id integer NOT NULL,
    email text NOT NULL
);

CREATE SEQUENCE users_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE users_id_seq OWNED BY users.id;

ALTER TABLE ONLY users ALTER COLUMN id SET DEFAULT nextval('users_id_seq'::regclass);

INSERT INTO schema_migrations VALUES ('20240101000000');
INSERT INTO schema_migrations VALUES ('20240102000000');

ALTER TABLE ONLY schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

ALTER TABLE ONLY users
    ADD CONSTRAINT users_pkey PRIMARY KEY (id);

CREATE INDEX users_email ON users USING btree (email);

