-- +migrate Up notransaction
create index concurrently accounts_name on accounts (name);

-- +migrate Down
drop index accounts_name;
