-- The tenant registry. In production the sign-up flow fills it; three tenants
-- are seeded so the example has a fleet to migrate.
-- kiln:up
CREATE TABLE public.tenants (
    slug       text PRIMARY KEY,
    name       text NOT NULL,
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.tenants (slug, name, active) VALUES
    ('acme', 'Acme Corp', true),
    ('globex', 'Globex', true),
    ('initech', 'Initech', true),
    ('hooli', 'Hooli', false);
-- kiln:down
DROP TABLE public.tenants;
