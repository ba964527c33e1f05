-- Rename users.full_name to display_name without stopping the application
-- (docs/zero-downtime.md). Deploy V2 (writes both, reads display_name ?? full_name)
-- after `kiln up`, V3 (display_name only) before `kiln contract 0002`.

-- kiln:expand
ALTER TABLE users ADD COLUMN display_name text;

-- kiln:backfill table=users key=id batch=5000
UPDATE users SET display_name = full_name
 WHERE id BETWEEN :lo AND :hi AND display_name IS NULL AND full_name IS NOT NULL;

-- kiln:contract
ALTER TABLE users DROP COLUMN full_name;

-- kiln:rollback
ALTER TABLE users DROP COLUMN display_name;
