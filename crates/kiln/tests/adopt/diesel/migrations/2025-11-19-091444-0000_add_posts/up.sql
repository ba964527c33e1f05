create table posts (id serial primary key, user_id int references users(id));
