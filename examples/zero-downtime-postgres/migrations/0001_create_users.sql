-- kiln:up
CREATE TABLE users (
    id         bigserial PRIMARY KEY,
    full_name  text,
    email      text
);

-- kiln:down
DROP TABLE users;
