-- +migrate Up
create table accounts (id int primary key, name text);
-- +migrate StatementBegin
create function touch() returns trigger as $$
begin
  new.name := lower(new.name);
  return new;
end;
$$ language plpgsql;
-- +migrate StatementEnd

-- +migrate Down
drop function touch();
drop table accounts;
