
CREATE TABLE _sqlx_migrations (
    version bigint NOT NULL,
    description text NOT NULL,
    installed_on timestamp with time zone DEFAULT now() NOT NULL,
    success boolean NOT NULL,
    checksum bytea NOT NULL,
    execution_time bigint NOT NULL
);

CREATE TABLE items (
    id bigint NOT NULL,
    title text NOT NULL
);

CREATE SEQUENCE items_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE items_id_seq OWNED BY items.id;

CREATE TABLE tags (
    id integer
);

ALTER TABLE ONLY items ALTER COLUMN id SET DEFAULT nextval('items_id_seq'::regclass);

INSERT INTO _sqlx_migrations VALUES (20240101000000, 'create items', '2026-12-02 01:05:18.496869+00', true, '\xb7e153889162a6d097fc7de7009d9e8f4b59aa6a92c846d46dd2bd1ed7dd19cb1e16634e7cc43c597431249f3278d9a8', 6158668);
INSERT INTO _sqlx_migrations VALUES (20240102000000, 'items title index', '2026-12-02 01:05:18.507146+00', true, '\x57c12a005554855b813ee517452feb0447d13444614c36105b693fd43bcfa4471dbaa555d8407e66f226a0bbf8351c82', 3463821);
INSERT INTO _sqlx_migrations VALUES (20240103000000, 'tags', '2026-12-02 01:05:18.508611+00', true, '\xbb9c046b4d52ed6e14942b28c234907acca5f9cdd84d839d9939c951bf5b87c32effccabf7d66eee44df2df0bbb036cf', 1639277);

ALTER TABLE ONLY _sqlx_migrations
    ADD CONSTRAINT _sqlx_migrations_pkey PRIMARY KEY (version);

ALTER TABLE ONLY items
    ADD CONSTRAINT items_pkey PRIMARY KEY (id);

CREATE INDEX items_title ON items USING btree (title);

