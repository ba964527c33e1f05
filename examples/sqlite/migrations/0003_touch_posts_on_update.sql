-- kiln:up
-- A trigger body holds `;` inside BEGIN … END; kiln keeps it in one statement.
CREATE TRIGGER posts_touch AFTER UPDATE OF title, body ON posts
BEGIN
    UPDATE posts SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id;
END;

-- kiln:down
DROP TRIGGER posts_touch;
