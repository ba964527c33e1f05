drop table setup_marker;
