create table setup_marker (id int);
